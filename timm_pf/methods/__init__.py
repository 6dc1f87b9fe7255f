"""Algorithms of the papers on timm models (RBA, Replacement Learning) and the model statistics:
they take models and batches and never touch the Hub."""
