"""The `raythyroid` command. User mistakes end in one line and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import os
import sys

from .errors import UserError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints the whole usage block; one line
        raise UserError(f"{message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {value}")
    return value


def _image_size(text: str) -> int:
    value = _positive_int(text)
    if value < 32 or value % 16:
        raise argparse.ArgumentTypeError(f"size must be a multiple of 16 and at least 32 "
                                         f"(the U-Net halves it four times), got {value}")
    return value


def _add_cluster_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, imaging, layouts

    parser = _Parser(prog="raythyroid",
                     description="Thyroid nodule segmentation in ultrasound, as Ray jobs.")
    parser.add_argument("--version", action="version", version=f"raythyroid {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    pre = commands.add_parser("preprocess", help="image/mask sets -> Parquet shards by split")
    pre.add_argument("input", help="dataset root: local folder or s3://bucket/prefix")
    pre.add_argument("output", help="output folder or s3:// prefix")
    pre.add_argument("--layout", choices=layouts.LAYOUTS, default="auto")
    pre.add_argument("--size", type=_image_size, default=256, help="prepared image side (px)")
    pre.add_argument("--split", default="0.7,0.2,0.1", help="train,val,test fractions by case")
    pre.add_argument("--seed", type=int, default=0, help="split seed")
    pre.add_argument("--no-crop", action="store_true",
                     help="keep the whole frame (images without scanner borders or text)")
    pre.add_argument("--max-pixels", type=_positive_int, default=imaging.DEFAULT_MAX_PIXELS,
                     help="reject larger images (checked from the header before decoding)")
    _add_cluster_flag(pre)
    pre.set_defaults(handler=_preprocess)

    gen = commands.add_parser("phantoms", help="write synthetic frames + masks (folders layout)")
    gen.add_argument("output", help="folder or s3:// prefix")
    gen.add_argument("--count", type=_positive_int, default=200)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--height", type=_positive_int, default=360)
    gen.add_argument("--width", type=_positive_int, default=560)
    gen.set_defaults(handler=_phantoms)

    demo = commands.add_parser("demo", help="the whole pipeline on phantoms, locally")
    demo.add_argument("workdir", nargs="?", default="demo-run")
    _add_cluster_flag(demo)
    demo.set_defaults(handler=_demo)
    return parser


def _preprocess(args: argparse.Namespace) -> int:
    from . import layouts, preprocess, runtime, split, storage
    from .imaging import PrepConfig

    fractions = split.parse_fractions(args.split)
    storage.check_readable_root(args.input)
    storage.check_writable_root(args.output)
    scanned = layouts.scan(storage.normalize(args.input), args.layout)
    config = PrepConfig(size=args.size, desensitize=not args.no_crop)
    with runtime.session(args.address):
        preprocess.run(args.input, args.output, config=config, fractions=fractions,
                       seed=args.seed, max_pixels=args.max_pixels, scanned=scanned)
    return 0


def _phantoms(args: argparse.Namespace) -> int:
    from . import phantom, storage

    storage.check_writable_root(args.output)
    keys = phantom.write_folders(args.output, args.count, args.seed, args.height, args.width)
    print(f"phantoms: wrote {len(keys)} frames and masks to {args.output}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from . import demo, runtime, storage

    storage.check_writable_root(args.workdir)
    with runtime.session(args.address):
        demo.run(args.workdir)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except UserError as exc:
        print(f"raythyroid: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("raythyroid: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
