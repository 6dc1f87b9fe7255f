"""The benchmark's plot: latency against params and MACs, and the ratio against image size for a
resolution sweep (needs the ``plot`` extra, matplotlib)."""
from .report import ratio_vs_resolution, run_conditions
from .runner import BenchResult

__all__ = ['plot_result']


def plot_result(result: BenchResult, path: str) -> None:
    """Latency vs params and latency vs GMACs, one row of panels per setting, one colour per family;
    a model whose latency ratio is unstable is drawn hollow and labelled so. A run over several image
    sizes adds a row: latency and memory ratio against image size, one line per pair, 1.0 marked.

    Raises ImportError with an install hint when matplotlib (the ``plot`` extra) is missing.
    """
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install 'timm-pf[plot]'") from err
    settings = list(dict.fromkeys(r.setting for r in result.rows))
    sweep = ratio_vs_resolution(result)
    panel_rows = len(settings) + bool(sweep)
    fig, axes = plt.subplots(panel_rows, 2, figsize=(12, 4.5 * panel_rows), squeeze=False)
    if sweep:
        _plot_sweep(axes[-1], sweep, result, colors=plt.rcParams['axes.prop_cycle'].by_key()['color'])
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for axes_row, setting in zip(axes[:len(settings)], settings):
        rows = [r for r in result.rows if r.setting == setting]
        families = list(dict.fromkeys(r.baseline or r.model for r in rows))
        by_name = {r.model: r for r in rows}
        for ax, (xkey, xlabel) in zip(axes_row, [('params', 'params (M)'), ('macs', 'GMACs per image')]):
            scale = 1e6 if xkey == 'params' else 1e9
            for i, family in enumerate(families):
                color = colors[i % len(colors)]
                for r in rows:
                    if (r.baseline or r.model) != family or r.latency_ms is None:
                        continue  # another family, or not timed
                    x = getattr(r, xkey) / scale
                    is_base = r.model == family
                    ax.scatter(x, r.latency_ms, marker='s' if is_base else 'o', s=50, zorder=3,
                               facecolors='none' if r.latency_ratio_unstable else color, edgecolors=color,
                               label=family if is_base else None)
                    spread = [[r.latency_ms - r.latency_q1_ms], [r.latency_q3_ms - r.latency_ms]]
                    ax.errorbar(x, r.latency_ms, yerr=spread, color=color, fmt='none', zorder=2)
                    label = r.model + (' (unstable ratio)' if r.latency_ratio_unstable else '')
                    ax.annotate(label, (x, r.latency_ms), fontsize=7, xytext=(4, 4), textcoords='offset points')
                    base = by_name.get(r.baseline) if r.baseline else None
                    if base is not None and base.latency_ms is not None:
                        ax.plot([getattr(base, xkey) / scale, x], [base.latency_ms, r.latency_ms], color=color,
                                linestyle='--', linewidth=1, zorder=1)
            ax.set_xscale('log')
            ax.set_yscale('log')
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(ScalarFormatter())
                axis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(xlabel)
            ax.set_ylabel('latency (ms, median; bars: IQR)')
            ax.set_title(f'{setting}, {result.options.device} {run_conditions(result.options)}', fontsize=10)
            ax.grid(True, which='both', alpha=0.3)
        axes_row[0].legend(fontsize=8, title='family (square: baseline)', title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_sweep(axes_row, sweep, result: BenchResult, colors) -> None:
    """Latency (left) and memory (right) ratio against image size, one line per pair and setting."""
    for ax, key, title in zip(axes_row, ('latency_ratio', 'memory_ratio'), ('latency', 'peak memory')):
        for i, pair in enumerate(sweep):
            points = [(p['img_size'], p[key]) for p in pair['sizes'] if p[key] is not None]
            if not points:
                continue
            label = f'{pair["model"]} / {pair["baseline"]}, {pair["mode"]} b{pair["batch_size"]}'
            color = colors[i % len(colors)]
            ax.plot(*zip(*points), marker='o', color=color, label=label)
            if key == 'latency_ratio':
                ringed = [(p['img_size'], p[key]) for p in pair['sizes'] if p['latency_ratio_unstable']]
                if ringed:
                    labelled = 'unstable ratio' in ax.get_legend_handles_labels()[1]
                    ax.scatter(*zip(*ringed), s=120, facecolors='none', edgecolors='red', zorder=3,
                               label=None if labelled else 'unstable ratio')
        ax.axhline(1.0, color='black', linewidth=1, linestyle=':')
        ax.set_xlabel('image size (px)')
        ax.set_ylabel(f'{title} ratio (ours / baseline; below 1 is better)')
        ax.set_title(f'{title} ratio vs image size, {result.options.device} {run_conditions(result.options)}',
                     fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
