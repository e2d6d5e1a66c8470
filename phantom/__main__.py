"""python -m phantom quickstart | world | warmup | dataset (see phantom/__init__.py)."""
import argparse
import sys

from phantom import ensure_world, make_phantom
from phantom.world import PHANTOM_DEFAULTS


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["quickstart"]:
        from phantom import quickstart
        sys.exit(quickstart.main(argv[1:]))
    if argv[:1] == ["warmup"]:                      # the warm-up takes sft.py's flags
        from phantom import warmup
        import runtime
        warmup.main(argv[1:])
        sys.exit(runtime.exit_code())
    ap = argparse.ArgumentParser(prog="python -m phantom", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("quickstart", help="every stage in turn, then the time and results tables (--fresh: redo all)")
    sub.add_parser("warmup", help="train the tiny LLM (flags: python -m phantom warmup --help)")
    for name, text in (("world", "build the whole world (dataset, caches, labels, questions, tiny models)"),
                       ("dataset", "write only the raw dataset (CT-RATE v2 layout + RAD-ChestCT subset)")):
        a = sub.add_parser(name, help=text)
        if name == "world":
            a.add_argument("--root", default="runs/phantom")
        else:
            a.add_argument("--out", required=True)
        a.add_argument("--n-train", type=int, default=None, help="training volumes (default 400)")
        a.add_argument("--n-valid", type=int, default=None, help="validation volumes (default 340)")
        a.add_argument("--n-rad", type=int, default=None, help="RAD-ChestCT-format volumes (default 340)")
        a.add_argument("--seed", type=int, default=None, help="default 0")
        a.add_argument("-v", "--verbose", action="store_true", help="print every path")
    args = ap.parse_args(argv)
    if args.cmd == "dataset":
        d = PHANTOM_DEFAULTS
        make_phantom(args.out, args.n_train or d["n_train"], args.n_valid or d["n_valid"],
                     d["n_rad"] if args.n_rad is None else args.n_rad, args.seed or 0)
        print(f"phantom dataset written to {args.out}")
        return
    paths = ensure_world(args.root, args.n_train, args.n_valid, args.n_rad, args.seed, progress=True)
    if args.verbose:
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    print(f"phantom world ready in {paths['root']} (MMVQA: {paths['mmvqa_valid']}, tiny LLM: {paths['tiny_llm']})")


if __name__ == "__main__":
    main()
