"""The `lorafit` command: train, compare, sweep, evaluate, predict, export (merge), data download.

Training flags are derived from `RunConfig`'s fields, so a flag and its field never
drift apart. Every `LorafitError` is printed as one `error:` line with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

from lorafit.config import RunConfig, field_types, is_auto_lr, make_config
from lorafit.strategies import STRATEGY_NAMES
from lorafit.errors import ConfigError, Interrupted, LorafitError


def _lr_value(text: str) -> float | str:
    """--lr: a number, or auto (`lorafit.lr_search`)."""
    if is_auto_lr(text):
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number (such as 2e-3) nor auto") from None


def _add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    types_ = field_types()
    for f in dataclasses.fields(RunConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp, _ = types_[f.name]
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ += f" (default: {','.join(default) if isinstance(default, list) else default})"
        kw: dict = dict(default=argparse.SUPPRESS, help=help_, dest=f.name)
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        kw["type"] = _lr_value if f.name == "lr" else {int: int, float: float}.get(tp, str)
        kw["metavar"] = f.name.upper() if tp is not list else "NAMES"
        p.add_argument(flag, **kw)
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file of settings; flags override it")
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/<strategy or compare>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the per-epoch lines stay)")


def _config(args: argparse.Namespace) -> RunConfig:
    names = {f.name for f in dataclasses.fields(RunConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return make_config(args.config, **overrides)


def _refuse_flags_with_resume(args: argparse.Namespace, what: str) -> None:
    """`--resume` takes the saved config: any setting flag beside it is an error naming the flag."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    given = sorted(k for k in vars(args) if k in names)
    given += [k for k in ("config", "out", "overwrite", "strategies") if getattr(args, k, None)]
    if given:
        flag = given[0].replace("_", "-")
        raise ConfigError(f"--resume continues {what} with its saved config; drop --{flag}")


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from lorafit import distributed
    from lorafit.api import default_out, train
    from lorafit.runs import check_out_dir, read_run_config

    relaunch = args.nproc > 1 and not distributed.launched()
    if args.resume:
        _refuse_flags_with_resume(args, "a run")
        run_dir = Path(args.resume)
        cfg = read_run_config(run_dir)
        if relaunch:
            return distributed.launch(_without_nproc(args.argv), args.nproc)
        train(resume=run_dir, progress=not args.no_progress)
        return 0
    cfg = _config(args)
    if args.out:
        out = Path(args.out)
    elif distributed.launched():
        raise ConfigError("a job of several processes needs --out: every process must write to the same folder")
    else:
        out = default_out(cfg.strategy)
    if relaunch:  # settings and the folder are checked once, here, before the processes start
        check_out_dir(out, args.overwrite)
        return distributed.launch([*_without_nproc(args.argv), *([] if args.out else ["--out", str(out)])],
                                  args.nproc)
    train(config=cfg, out=out, overwrite=args.overwrite, progress=not args.no_progress)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lorafit.api import cli_command, compare
    from lorafit.report import markdown_table

    if args.resume:
        _refuse_flags_with_resume(args, "a comparison")
        result = compare(resume=args.resume, progress=not args.no_progress, nproc=args.nproc, command=cli_command())
    else:
        result = compare(config=_config(args), strategies=args.strategies.split(",") if args.strategies else None,
                         out=args.out, overwrite=args.overwrite, progress=not args.no_progress, nproc=args.nproc,
                         command=cli_command())
    print("\n" + markdown_table(result.report["rows"]))
    print(f"report: {result.path / 'report.md'} ({result.report['wall_seconds'] / 60:.1f} min)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from lorafit.api import cli_command, sweep
    from lorafit.grid import parse_grid

    if args.resume:
        _refuse_flags_with_resume(args, "a sweep")
        result = sweep(resume=args.resume, progress=not args.no_progress, nproc=args.nproc, command=cli_command())
    else:
        names = {f.name for f in dataclasses.fields(RunConfig)}
        fixed, swept = parse_grid({k: v for k, v in vars(args).items() if k in names})
        result = sweep(swept, config=args.config, out=args.out, overwrite=args.overwrite,
                       progress=not args.no_progress, nproc=args.nproc, command=cli_command(), **fixed)
    print((result.path / "report.md").read_text().split("\n\n", 3)[-1].split("![report]")[0].strip())
    print(f"report: {result.path / 'report.md'} ({result.report['wall_seconds'] / 60:.1f} min)")
    return 0


def _add_sweep_flags(p: argparse.ArgumentParser) -> None:
    """Every RunConfig field, repeatable, values as text: parse_grid converts and sweeps them."""
    types_ = field_types()
    for f in dataclasses.fields(RunConfig):
        tp, _ = types_[f.name]
        kw: dict = dict(default=argparse.SUPPRESS, dest=f.name, action="append",
                        help=f"{f.metadata.get('help', '')} (several values: swept)")
        if tp is bool:
            kw.update(nargs="?", const="true", metavar="true,false")
        else:
            kw["metavar"] = "VALUES"
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file of settings every run starts from")
    p.add_argument("--out", metavar="DIR", help="sweep folder (default: runs/sweep-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing sweep folder at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the per-epoch lines stay)")
    p.add_argument("--resume", metavar="OUT_DIR", help="continue an interrupted sweep (finished runs are kept)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lorafit.api import load_run
    from lorafit.exported import is_export, read_export_info

    result = load_run(args.run_dir, adapter=args.adapter).evaluate(args.data, progress=not args.no_progress)
    if is_export(args.run_dir) and "int8" in read_export_info(Path(args.run_dir)).get("onnx_files", {}):
        # the quantized graph's accuracy beside the fp32 one's: no silent accuracy loss
        int8 = load_run(args.run_dir, variant="int8").evaluate(args.data, progress=not args.no_progress)
        result["int8"] = {k: int8[k] for k in ("test_accuracy", "test_macro_f1", "test_loss", "test_per_class",
                                                "test_confusion")}
        result["int8_accuracy_change"] = int8["test_accuracy"] - result["test_accuracy"]
    print(json.dumps(result, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from lorafit.api import load_run

    texts = list(args.texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise LorafitError("no text to classify; pass texts as arguments or lines on standard input")
    run = load_run(args.run_dir, adapter=args.adapter, variant="int8" if args.int8 else "fp32")
    for p in run.predict(texts):
        print(f"{p['label']}\t{p['probability']:.4f}\t{p['text'][:80]}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lorafit.exporter import export

    fmt = getattr(args, "format", "hf")
    result = export(args.run_dir, args.out_dir, format=fmt, adapter=args.adapter, quantize=args.quantize)
    how = {"transformers": "AutoModelForSequenceClassification.from_pretrained",
           "sentence-transformers": "sentence_transformers.SentenceTransformer (encode returns the logits)",
           "onnx": "onnxruntime.InferenceSession on model.onnx"}[result.layout]
    print(f"exported {args.run_dir} ({fmt}, {result.layout}) to {result.path}: load it with {how}; "
          f"its README.md says how")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lorafit.serve import ServeSettings, serve

    settings = ServeSettings(max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
                             max_queue=args.max_queue, max_inputs=args.max_inputs,
                             api_key=args.api_key or os.environ.get("LORAFIT_API_KEY") or None,
                             adapter_root=args.adapter_root)
    serve(args.paths, args.adapter, host=args.host, port=args.port, settings=settings)
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from lorafit.data.download import IMDB_SHA256, IMDB_URL, download_imdb

    path = download_imdb(Path(args.cache_dir) if args.cache_dir else None, url=args.url or IMDB_URL,
                         sha256=args.sha256 if args.sha256 is not None else IMDB_SHA256)
    print(path)
    return 0


_ADAPTER_FLAG = ("--adapter",)
_ADAPTER_HELP = dict(metavar="NAME", help="which adapter, where the run's adapter folder holds several (default: the "
                     "one named default, saved at the folder's top)")


def _process_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of processes, 1 or more; got {text!r}")
    return n


def _add_nproc_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=_process_count, default=1, metavar="N",
                   help="train data-parallel in N processes on this machine, started through torchrun (default 1; "
                   "for several machines run torchrun yourself: see the README)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorafit", description="Fine-tune encoders with LoRA and compare strategies.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one strategy")
    _add_config_flags(t)
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    _add_nproc_flag(t)
    t.set_defaults(func=cmd_train)
    c = sub.add_parser("compare", help="train full, last-two-layers and lora on the same data and seed; report")
    _add_config_flags(c, skip=("strategy",))
    c.add_argument("--strategies", metavar="NAMES",
                   help=f"comma-separated subset (default: {','.join(STRATEGY_NAMES)})")
    c.add_argument("--resume", metavar="OUT_DIR",
                   help="continue an interrupted comparison (finished strategies are kept)")
    _add_nproc_flag(c)
    c.set_defaults(func=cmd_compare)
    sw = sub.add_parser("sweep", help="every combination of the listed settings, one run each; a Pareto report",
                        description="A flag given several times or with a comma list is swept (--targets: each "
                        "occurrence is one value); a flag given once applies to every run.")
    _add_sweep_flags(sw)
    _add_nproc_flag(sw)
    sw.set_defaults(func=cmd_sweep)
    e = sub.add_parser("evaluate", help="test accuracy of a run's weights")
    e.add_argument("run_dir", help="a run folder, or an export folder (lorafit export)")
    e.add_argument("--data", help="another data source (default: the run's)")
    e.add_argument(*_ADAPTER_FLAG, **_ADAPTER_HELP)
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_evaluate)
    pr = sub.add_parser("predict", help="label and probability per text (arguments, or lines on stdin)")
    pr.add_argument("run_dir", help="a run folder, or an export folder (lorafit export)")
    pr.add_argument("texts", nargs="*")
    pr.add_argument(*_ADAPTER_FLAG, **_ADAPTER_HELP)
    pr.add_argument("--int8", action="store_true", help="an ONNX export's int8 graph instead of its fp32 one")
    pr.set_defaults(func=cmd_predict)
    x = sub.add_parser("export", help="write a run as a model folder that transformers, sentence-transformers or "
                       "ONNX Runtime loads without lorafit")
    x.add_argument("run_dir")
    x.add_argument("out_dir")
    x.add_argument("--format", default="hf", help="hf (transformers; sentence-transformers for a mean-pooled run) "
                   "or onnx (default: hf)")
    x.add_argument("--quantize", metavar="int8", help="with --format onnx: add ONNX Runtime's dynamic int8 graph")
    x.add_argument(*_ADAPTER_FLAG, **_ADAPTER_HELP)
    x.set_defaults(func=cmd_export)
    m = sub.add_parser("merge", help="the same as export --format hf: LoRA merged into a standalone model folder")
    m.add_argument("run_dir")
    m.add_argument("out_dir")
    m.add_argument(*_ADAPTER_FLAG, **_ADAPTER_HELP)
    m.set_defaults(func=cmd_export, quantize=None)
    sv = sub.add_parser("serve", help="serve runs and exports over HTTP; adapters of one base model share it")
    sv.add_argument("paths", nargs="*", metavar="RUN_OR_EXPORT", help="folders to serve, each named by its folder name")
    sv.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="a folder served as NAME")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("--max-batch-tokens", type=int, default=16384, help="a batch closes at this many padded tokens")
    sv.add_argument("--max-wait-ms", type=float, default=5.0, help="... or when its oldest text waited this long")
    sv.add_argument("--max-queue", type=int, default=1024, help="texts waiting at most; beyond it, 503")
    sv.add_argument("--max-inputs", type=int, default=64, help="texts per request at most")
    sv.add_argument("--api-key", help="every route but /health needs Authorization: Bearer KEY (default: "
                    "$LORAFIT_API_KEY; none: no key)")
    sv.add_argument("--adapter-root", metavar="DIR", help="POST /adapters loads run folders under DIR only "
                    "(default: no loading at run time)")
    sv.set_defaults(func=cmd_serve)
    d = sub.add_parser("data", help="dataset utilities")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dl = dsub.add_parser("download", help="fetch the official IMDb archive into the cache")
    dl.add_argument("--cache-dir", help="folder (default: $LORAFIT_CACHE or the XDG cache, lorafit/)")
    dl.add_argument("--url", help="where to fetch it from (default: the Stanford address)")
    dl.add_argument("--sha256", help="expected checksum (default: the official archive's; '' skips the check)")
    dl.set_defaults(func=cmd_data_download)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # SIGINT saves a checkpoint and exits, also when the shell started us with SIGINT
    # ignored (a background job), which Python would otherwise keep.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # in a job of several processes, each says which one it is
    who = f"[rank {os.environ.get('RANK')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        return args.func(args)
    except Interrupted as exc:
        print(f"{who}error: {exc}", file=sys.stderr)
        return 130
    except LorafitError as exc:
        print(f"{who}error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
