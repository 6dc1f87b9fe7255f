"""``timm-pf build-kernels``: compile the batch-1 CPU kernel of the dynamic convs and check it."""
import argparse

from ._errors import Failure


def _self_check(kernel) -> float:
    """Largest difference between the kernel and the eager path over a few conv layouts."""
    import torch
    from timm_pf.layers import DynamicConv2d
    torch.manual_seed(0)
    worst = 0.
    for layer, size in ((DynamicConv2d(32, 48, 1), 14), (DynamicConv2d(24, 24, 3, 2, 1, groups=24), 15),
                        (DynamicConv2d(8, 16, 3, 1, 2, dilation=2, num_experts=7), 9)):
        x = torch.randn(1, layer.in_channels, size, size)
        with torch.no_grad():
            eager = layer(x, layer.routing_weights(x))  # given routing weights: the eager path
            fused = kernel.sigmoid_routed_conv2d(
                x, layer.routing.weight, layer.routing.bias, layer.weight, *layer.geometry)
        worst = max(worst, (fused - eager).abs().max().item())
    return worst


def _run(args: argparse.Namespace) -> int:
    from timm_pf.layers.cpu_kernels import build_cpu_kernels, kernel_status
    kernel = build_cpu_kernels(verbose=args.verbose)  # KernelBuildError: exit code 1 with the reason
    diff = _self_check(kernel)
    print(kernel_status())
    print(f'largest difference to the eager path: {diff:.2e}')
    if diff > 1e-4:
        raise Failure('the kernel disagrees with the eager path')
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        'build-kernels', help='compile the batch-1 CPU kernel of the dynamic convs (C++ compiler and ninja)',
        description=(
            'Compile the fused batch-1 CPU kernel of DynamicConv2d (pool, routing and expert mixing in one '
            "call) into the cache folder ($TIMM_PF_KERNEL_DIR, default ~/.cache/timm_pf/kernels), check it "
            'against the eager path, and print where it is. Once built, dynamic convs use it by default '
            '(TIMM_PF_CPU_KERNELS=auto); TIMM_PF_CPU_KERNELS=off keeps the eager path.'))
    p.add_argument('--verbose', action='store_true', help="show the compiler's output")
    p.set_defaults(func=_run)
