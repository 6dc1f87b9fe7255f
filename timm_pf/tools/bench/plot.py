"""The benchmark's plot: latency against params and MACs (needs the ``plot`` extra, matplotlib)."""
from .runner import BenchResult

__all__ = ['plot_result']


def plot_result(result: BenchResult, path: str) -> None:
    """Latency vs params and latency vs GMACs, one row of panels per setting, one colour per family;
    a model whose latency ratio is unstable is drawn hollow and labelled so.

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
    fig, axes = plt.subplots(len(settings), 2, figsize=(12, 4.5 * len(settings)), squeeze=False)
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for axes_row, setting in zip(axes, settings):
        rows = [r for r in result.rows if r.setting == setting]
        families = list(dict.fromkeys(r.baseline or r.model for r in rows))
        by_name = {r.model: r for r in rows}
        for ax, (xkey, xlabel) in zip(axes_row, [('params', 'params (M)'), ('macs', 'GMACs per image')]):
            scale = 1e6 if xkey == 'params' else 1e9
            for i, family in enumerate(families):
                color = colors[i % len(colors)]
                for r in rows:
                    if (r.baseline or r.model) != family:
                        continue
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
                    if base is not None:
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
            ax.set_title(f'{setting}, {result.options.device} {result.options.dtype}', fontsize=10)
            ax.grid(True, which='both', alpha=0.3)
        axes_row[0].legend(fontsize=8, title='family (square: baseline)', title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
