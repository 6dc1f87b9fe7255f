"""Tools around the models: the benchmark, the Hub (convert, publish), model cards, training recipes and
small datasets."""
