"""``timm-pf convert``, ``timm-pf push`` and ``timm-pf card``: publish weights and model cards on the Hub."""
import argparse
import tempfile
from pathlib import Path

from timm.utils import ParseKwargs

from ._args import branch_name, input_file, key_value, non_empty, number, output_dir, positive_int
from ._errors import BadInput, Failure


def register(subparsers) -> None:
    convert = subparsers.add_parser(
        'convert', help="convert a checkpoint (authors' .pth, timm train.py, safetensors) to timm's Hub layout",
        description="Convert a checkpoint into a folder with model.safetensors + config.json (timm's save_for_hf "
                    "layout). The authors' checkpoints go through the family's checkpoint_filter_fn; the result "
                    "must load strictly into the model. With -m MODEL.TAG config.json describes that tag; with a "
                    "bare -m MODEL it describes the checkpoint (its classes, the image size of its train.py "
                    "arguments or --img-size) and carries no tag or notes of ours. A mismatched or corrupted "
                    "checkpoint exits with code 2.",
    )
    _add_source_args(convert, 'checkpoint file: .pth / .pth.tar (authors\' or timm train.py) or .safetensors')
    convert.add_argument('-o', '--output', required=True, type=output_dir, help='output folder')
    convert.add_argument('--img-size', type=number(int, 8, 4096), default=None,
                         help="image size the weights were trained at (default: the tag's, or the train.py "
                              "arguments in the checkpoint; required for other checkpoints converted without a tag)")
    convert.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, type=key_value,
                         metavar='KEY=VALUE',
                         help="the model's kwargs as in timm's train.py, e.g. 'layers=[1,1,1,1]' stem_width=16")
    convert.set_defaults(func=run_convert)

    push = subparsers.add_parser(
        'push', help='upload weights with their model card to the Hub: a pretrained tag (-m) or any folder '
                     '(--repo-id)',
        description='With -m: upload a converted folder (or a checkpoint, converted on the way) to '
                    'timm-pf/<model>.<tag> with its model card from hub_cards/. With --repo-id ORG/NAME: upload a '
                    "folder in timm's save_for_hf layout (model.safetensors + config.json), e.g. an RBA model "
                    '(timm_pf.rba.save_rba) or a model finalised by timm_pf.replacement.finalize, with a card '
                    'rendered from its measured stats; it then loads with '
                    "timm.create_model('hf-hub:ORG/NAME', pretrained=True). Weights that do not load strictly "
                    'into the named model, or into the model config.json describes, are refused (exit 2). The '
                    'token comes from HF_TOKEN or `hf auth login`.',
    )
    target = push.add_mutually_exclusive_group(required=True)
    _add_source_args(push, 'with -m: a folder made by `timm-pf convert`, or a checkpoint file to convert on the '
                           "way; with --repo-id: a folder in timm's save_for_hf layout", model_group=target)
    target.add_argument('--repo-id', type=non_empty, default=None, metavar='ORG/NAME',
                        help='push the folder to this repository (a model that is not one of our pretrained tags)')
    push.add_argument('--card', type=input_file, default=None, metavar='FILE',
                      help='model card (README.md) to upload instead of the rendered one')
    push.add_argument('--revision', '--branch', dest='revision', type=branch_name, default=None,
                      help='branch to push to (created if missing; default: main)')
    push.add_argument('--private', action='store_true',
                      help='make the repository private (creates it private, or makes an existing public one '
                           'private before uploading; the Hub must allow it)')
    push.add_argument('--commit-message', default=None, help='commit message')
    push.add_argument('--dry-run', action='store_true', help='print what would be uploaded and upload nothing')
    push.set_defaults(func=run_push)

    card = subparsers.add_parser(
        'card', help='render model cards from hub_cards/ (stats measured by timm_pf.stats)',
        description='Print the model card of a pretrained tag, or with --write (re)generate the committed cards '
                    'hub_cards/cards/<model>.<tag>.md of every registered tag (or the named ones); --check '
                    'reports stale cards and exits with 1.',
    )
    card.add_argument('models', nargs='*', metavar='MODEL[.TAG]', help='models or tags (default with --write/'
                                                                      '--check: every registered tag)')
    mode = card.add_mutually_exclusive_group()
    mode.add_argument('--write', action='store_true', help='write the cards to hub_cards/cards/')
    mode.add_argument('--check', action='store_true', help='compare the committed cards with fresh ones')
    card.set_defaults(func=run_card)


def _add_source_args(parser: argparse.ArgumentParser, source_help: str, model_group=None) -> None:
    """The source and the pretrained tag it is for (-m, in ``model_group`` when another option may replace it)."""
    parser.add_argument('source', type=Path, help=source_help)
    (model_group or parser).add_argument('-m', '--model', required=model_group is None,
                                         help='model or pretrained tag, e.g. ours_r50_max.pf_in1k (no tag: the '
                                              'default one)')
    parser.add_argument('--ema', action='store_true', help="use the EMA weights of a timm train.py checkpoint")
    parser.add_argument('--num-classes', type=positive_int, default=None,
                        help="classes of the checkpoint's classifier (default: the tag's)")


def run_convert(args) -> int:
    from timm_pf.tools.hub import convert_checkpoint
    if args.source.is_dir():
        raise BadInput(f'{args.source} is a folder; convert takes a checkpoint file')
    result = convert_checkpoint(args.model, args.source, args.output, use_ema=args.ema,
                                num_classes=args.num_classes, model_kwargs=args.model_kwargs,
                                img_size=args.img_size)
    how = "through the family's checkpoint filter" if result.filtered else 'as is'
    print(f'{args.source} -> {result.folder} ({result.name_tag}, {result.num_params:,d} parameters, '
          f'{result.num_classes} classes, {result.px}, keys mapped {how}, strict load ok; '
          f'config.json describes {result.described_by})')
    return 0


def run_push(args) -> int:
    from timm_pf.tools.hub import HF_HUB_ORG, prepare_folder_push, prepare_push, push_to_hub, require_token
    if args.repo_id and (args.ema or args.num_classes is not None):
        raise BadInput('--ema and --num-classes convert a checkpoint for -m; --repo-id pushes a folder as it is')
    try:
        card_text = args.card.read_text(encoding='utf-8') if args.card else None
    except UnicodeDecodeError as e:
        raise BadInput(f'the card {args.card} is not UTF-8 text: {e}') from e
    with tempfile.TemporaryDirectory(prefix='timm-pf-push-') as staging:
        token = None if args.dry_run else require_token(
            namespace=args.repo_id.split('/')[0] if args.repo_id else HF_HUB_ORG)
        if args.repo_id:
            plan = prepare_folder_push(args.source, args.repo_id, staging, revision=args.revision,
                                       private=args.private, card_text=card_text)
        else:
            plan = prepare_push(args.model, args.source, staging, revision=args.revision, private=args.private,
                                use_ema=args.ema, num_classes=args.num_classes, card_text=card_text)
        if args.dry_run:
            print(f'dry run: would upload {plan.label} to {plan.describe()}')
            return 0
        print(f'uploading {plan.label} to {plan.describe()}')
        result = push_to_hub(plan, token=token, commit_message=args.commit_message)
    visibility = 'private' if result.private else 'public'
    print(f'pushed {plan.label}: {result.commit_url} (the repository is {visibility}, as the Hub reports it)')
    return 0


def run_card(args) -> int:
    from timm_pf._data import HUB_CARDS, checkout_dir, data_dir
    from timm_pf.tools.cards import card_names, orphan_cards, render_card, resolve_card_name, write_cards
    names = [resolve_card_name(m) for m in args.models]
    if not (args.write or args.check):
        if len(names) != 1:
            raise BadInput('name one model or tag to print its card, or use --write / --check')
        print(render_card(names[0]), end='')
        return 0
    if args.write and checkout_dir(HUB_CARDS) is None:
        raise BadInput(f'--write regenerates hub_cards/cards/ of a source checkout (pip install -e); the cards at '
                       f'{data_dir(HUB_CARDS)} are part of the installed package: print one with `timm-pf card NAME`')
    statuses = write_cards(names or card_names(), check_only=args.check)
    orphans = [] if names else orphan_cards(card_names())
    for path in orphans:
        print(f'{"orphan " if args.check else "removed"} {path} (no such registered tag or variant)')
        if args.write:
            path.unlink()
    stale = [s for s in statuses if not s.up_to_date] + (orphans if args.check else [])
    if args.check and stale:
        raise Failure(f'{len(stale)} card(s) out of date: run `timm-pf card --write`')
    return 0
