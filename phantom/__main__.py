"""python -m phantom quickstart | world | warmup | dataset (see phantom/__init__.py)."""
import argparse
import sys

import runtime
from phantom import ensure_world, make_phantom
from phantom.world import PHANTOM_DEFAULTS


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["quickstart"]:
        from phantom import quickstart
        sys.exit(quickstart.main(argv[1:]))
    if argv[:1] == ["warmup"]:                      # the warm-up takes sft.py's flags
        from phantom import warmup
        warmup.main(argv[1:])
        sys.exit(runtime.exit_code())
    ap = argparse.ArgumentParser(prog="python -m phantom", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("quickstart", help="every stage, two at a time, then the time and result tables (--fresh: redo all)")
    sub.add_parser("warmup", help="train the tiny LLM (flags: python -m phantom warmup --help)")
    for name, text in (("world", "build the whole world (dataset, caches, labels, questions, tiny models)"),
                       ("dataset", "write only the raw dataset (CT-RATE v2 layout + RAD-ChestCT subset)")):
        a = sub.add_parser(name, help=text)
        if name == "world":
            a.add_argument("--root", default="runs/phantom", help="every stage's --data-root (default: %(default)s)")
            a.add_argument("-v", "--verbose", action="store_true", help="print every path")
        else:
            a.add_argument("--out", required=True, help="the dataset's folder")
        default = "default: the existing world's, else" if name == "world" else "default:"
        for key, what in (("n_train", "training volumes"), ("n_valid", "validation volumes"),
                          ("n_rad", "RAD-ChestCT volumes"), ("seed", "seed")):
            a.add_argument("--" + key.replace("_", "-"), type=runtime.at_least(int(key != "seed")),
                           help=f"{what} ({default} {PHANTOM_DEFAULTS[key]})")
    args = ap.parse_args(argv)
    if args.cmd == "dataset":
        make_phantom(args.out, *[PHANTOM_DEFAULTS[k] if getattr(args, k) is None else getattr(args, k)
                                 for k in ("n_train", "n_valid", "n_rad", "seed")])
        print(f"phantom dataset written to {args.out}")
        return
    paths = ensure_world(args.root, args.n_train, args.n_valid, args.n_rad, args.seed, progress=True)
    if args.verbose:
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    print(f"phantom world ready in {paths['root']} (MMVQA: {paths['mmvqa_valid']}, tiny LLM: {paths['tiny_llm']})")


if __name__ == "__main__":
    main()
