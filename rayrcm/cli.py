"""``rayrcm``: a thin command line over recipes and the Ray layer.

    rayrcm quickstart [--set key=value ...]
    rayrcm train RECIPE [--set key=value ...]        # a .py or .yaml recipe, one training stage
    rayrcm config RECIPE [--set key=value ...]       # print the resolved, validated config
    rayrcm tune RECIPE --space method.lbd=grid:5,10,20 [--space ...] [--sweep num_samples=2 ...] [--set ...]
    rayrcm certify --model REF --sigma 0.25 [--n0 100 --n 100000 --alpha 0.001 --skip 20 --max 500 --plugin M ...]
    rayrcm certify --model REF --sigma 0.25 --sampling sequential --radii 0,0.25,0.5,0.75 [--max-n 100000]
    rayrcm predict --model REF --sigma 0.25 [--n 100000 --alpha 0.001 ...]
    rayrcm evaluate --model REF --suite clean,corruptions,pgd,aa [--severities 1,3,5 --corruptions NAMES ...]
    rayrcm analyze RESULTS... [--radii 0,0.25,0.5] [--out DIR]
    rayrcm compare RUN_OR_DIR... [--latex] [--out FILE] [--radii 0,0.25,0.5] [--per-class] [--tracking-uri URI]
    rayrcm export MODEL --format onnx [--out FILE] [--check 64] [--opset 18]
    rayrcm export-results RUN_OR_DIR... --format robustbench [--name NAME] [--architecture A] [--out DIR]
    rayrcm mlflow-server --backend-store-uri URI --artifacts-destination URI [--host 0.0.0.0] [--detach]

Bad input gives one line on stderr (``rayrcm: error: ...``) and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from rayrcm.cli_parse import (
    CERTIFY_FLAGS,
    Parser,
    add_sampling_args,
    check_sampling_flags,
    one_line_errors,
)
from rayrcm.errors import ConfigError

# flag -> key of rayrcm.orchestration.evaluate_job.EvaluateConfig
EVALUATE_FLAGS = {
    "model": "model", "suite": "suite", "severities": "severities", "corruptions": "corruptions", "c_path": "c_path",
    "shift_path": "shift_path", "shift": "shifts", "class_list": "class_list",
    "dataset": "dataset", "data_path": "data_path", "split": "split", "skip": "skip", "max_images": "max_images",
    "seed": "seed", "shard_size": "shard_size", "batch": "batch", "eps": "eps", "pgd_steps": "pgd_steps",
    "workers": "workers", "gpu": "use_gpu", "name": "name", "out": "out_dir", "tracking_uri": "tracking.uri",
    "experiment": "tracking.experiment", "plugin": "plugins",
}


_RAW = argparse.RawDescriptionHelpFormatter
KEYS = ("keys: every --set key and its current value is listed by\n"
        "  rayrcm config RECIPE [--set ...]        # e.g. rayrcm config examples/cifar10_gaussian.py")
EPILOGS = {
    "quickstart": "example:\n  rayrcm quickstart --set train.workers=1",
    "train": "example:\n  rayrcm train examples/cifar10_gaussian.py --set data.path=DIR --set train.epochs=1\n\n" + KEYS,
    "config": "example:\n  rayrcm config examples/cifar10_gaussian.py --set optim.lr=0.05",
    "tune": "example:\n  rayrcm tune examples/cifar10_gaussian.py --set data.path=DIR --space optim.lr=loguniform:1e-3,0.3 "
            "--sweep num_samples=8\n\n" + KEYS,
    "certify": "example:\n  rayrcm certify --model models:/cifar10-gaussian@sigma-0_25 --sigma 0.25 --n 100000 --skip 20\n"
               "  rayrcm certify --model models:/cifar10-gaussian@sigma-0_25 --sigma 0.25 --skip 20 "
               "--sampling sequential --radii 0,0.25,0.5,0.75",
    "predict": "example:\n  rayrcm predict --model models:/cifar10-gaussian@sigma-0_25 --sigma 0.25 --n 100000 --skip 20",
    "evaluate": "example:\n  rayrcm evaluate --model models:/cifar10-acl@finetuned --suite clean,corruptions,pgd "
                "--severities 1,3,5 --workers 4\n\n"
                "Corruptions are generated with CIFAR-10-C's parameters (labelled 'generated': new draws, not the\n"
                "released files) unless --c-path names a released CIFAR-10-C / CIFAR-100-C folder.",
    "analyze": "example:\n  rayrcm analyze rayrcm_results/certify/JOB1 rayrcm_results/certify/JOB2 --radii 0,0.25,0.5",
    "compare": "example:\n  rayrcm compare rayrcm_results/evaluate/JOB1 rayrcm_results/evaluate/JOB2 "
               "rayrcm_results/certify/JOB3 --latex --out table.md\n\n"
               "RUN_OR_DIR: a folder of rayrcm evaluate / certify / predict, or an MLflow run id (its results,\n"
               "certification rows, or fine-tuning metrics; tracking URI from --tracking-uri or $MLFLOW_TRACKING_URI).",
    "export": "example:\n  rayrcm export models:/rcm-digits@sigma-0_25 --format onnx --out rcm-digits.onnx\n\n"
              "Input: float32 images in [0, 1], normalisation inside; written once onnxruntime agrees with PyTorch.",
    "export-results": "example:\n  rayrcm export-results rayrcm_results/evaluate/JOB --format robustbench --name Me2026Robust "
                      "--architecture ResNet-18\n\nWrites <out>/<dataset>/Linf/<name>.json (the standard AutoAttack) and "
                      "<out>/<dataset>/corruptions/<name>.json\n(the released CIFAR-10-C / ImageNet-C at 15 corruptions x 5 "
                      "severities; ImageNet-C with RobustBench's mCE).",
    "mlflow-server": "example:\n  rayrcm mlflow-server --backend-store-uri sqlite:////mnt/rayrcm/mlflow.db "
                     "--artifacts-destination s3://bucket/mlflow --host 0.0.0.0 --detach",
}


def _sub(sub, name: str, help_: str) -> argparse.ArgumentParser:
    """A verb with its one-line help as description and an example (and where the keys are) as epilog."""
    return sub.add_parser(name, help=help_, description=help_, epilog=EPILOGS[name], formatter_class=_RAW)


def _certify_parser(sub, name: str, help_: str) -> None:
    c = _sub(sub, name, help_)
    c.add_argument("--model", required=True, help="models:/name@alias, models:/name/<version>, a run id, runs:/<id>/model or a model.pt path")
    c.add_argument("--denoiser", help="denoised smoothing (DDS): certify model(denoiser(x + sigma z)); a rayrcm denoiser "
                   "model.pt (a ddpm run's), its folder, a run id, runs:/ or models:/ reference")
    c.add_argument("--dataset", help="default: the dataset the model was trained on")
    c.add_argument("--data-path", help="default: the model's training data path")
    c.add_argument("--split", help="test (default) or val")
    c.add_argument("--corruption", help="with --dataset cifar10c or cifar100c (--data-path: the released .npy files): "
                                        "the corruption, e.g. fog")
    c.add_argument("--severity", help="with --corruption: its severity, 1-5")
    c.add_argument("--sigma", help="noise std in [0, 1] pixel units (default 0.25)")
    if name == "certify":
        c.add_argument("--n0", help="selection samples (default 100; with --sampling iss also the pilot that plans n)")
    c.add_argument("--n", help="estimation samples (default 100000; with --sampling iss the most an image gets)")
    c.add_argument("--alpha", help="failure probability (default 0.001)")
    c.add_argument("--seed", help="noise seed (default 0)")
    c.add_argument("--skip", help="certify every skip-th image (default 1)")
    c.add_argument("--max", help="stop at this dataset index (default -1: the whole split)")
    c.add_argument("--indices", help="explicit dataset indices, comma separated")
    c.add_argument("--chunk", help="samples per unit of work (default 10000)")
    if name == "certify":
        add_sampling_args(c)
    c.add_argument("--batch", help="samples per forward pass (default 0: fill the device)")
    c.add_argument("--workers", help="counting actors (default 1)")
    c.add_argument("--gpu", action="store_const", const="true", help="one GPU per actor")
    c.add_argument("--precision", help="fp32 (default), bf16 or fp16")
    c.add_argument("--channels-last", action="store_const", const="true")
    c.add_argument("--name", help="job name; rerunning a name resumes it")
    c.add_argument("--out", help="results folder (default $RAYRCM_STORAGE/certify, else ./rayrcm_results/certify)")
    c.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    c.add_argument("--experiment", help="MLflow experiment (default: the model's)")
    c.add_argument("--plugin", action="append", metavar="MODULE|FILE.py",
                   help="import this module or .py file first, in the driver and every actor (repeatable): "
                        "your registered export kinds and datasets")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any CertifyConfig key, e.g. --set compute.flush_every=4")


def _evaluate_parser(sub) -> None:
    e = _sub(sub, "evaluate", "robustness suite (clean, corruptions, PGD, AutoAttack) over a test set, sharded with Ray Data")
    e.add_argument("--model", required=True,
                   help="models:/name@alias, models:/name/<version>, a run id, runs:/<id>/model or a model.pt path")
    e.add_argument("--suite", help="comma separated: clean, corruptions, pgd, aa (the standard AutoAttack: APGD-CE, "
                                   "APGD-T, FAB-T, Square), aa-apgd (APGD-CE + APGD-T only: faster, an upper bound), "
                                   "shift (default clean,corruptions)")
    e.add_argument("--severities", help="corruption severities 1-5, comma separated (default 1,3,5)")
    e.add_argument("--corruptions", help="corruption names, comma separated (default: every one that can be generated, "
                                         "or every file of --c-path)")
    e.add_argument("--c-path", help="a released CIFAR-10-C / CIFAR-100-C folder (<corruption>.npy, labels.npy), or "
                                    "for an imagefolder model ImageNet-C (<corruption>/<severity>/<wnid>/); "
                                    "default: generate the corruptions")
    e.add_argument("--shift-path", help="the CIFAR-10.1 folder (cifar10.1_v6_data.npy, cifar10.1_v6_labels.npy) "
                                        "of the shift part (= --shift cifar10.1=DIR)")
    e.add_argument("--shift", action="append", metavar="NAME=PATH",
                   help="a shifted set of the shift part (repeatable): cifar10.1, sketch (ImageNet-Sketch), "
                        "r (ImageNet-R: logits masked to its classes), stylized (Stylized-ImageNet) folders")
    e.add_argument("--class-list", help="the model's classes, one wnid per line in output order, that the folder "
                                        "sets are restricted to (default: the dataset's class folders)")
    e.add_argument("--dataset", help="default: the dataset the model was trained on")
    e.add_argument("--data-path", help="default: the model's training data path")
    e.add_argument("--split", help="test (default) or val")
    e.add_argument("--skip", help="every skip-th image (default 1)")
    e.add_argument("--max-images", help="at most this many images (default 0: all)")
    e.add_argument("--seed", help="seed of the generated corruptions and the attacks' starts (default 0)")
    e.add_argument("--shard-size", help="images per unit of work (default 500)")
    e.add_argument("--batch", help="images per forward pass (default 256)")
    e.add_argument("--eps", help="L-inf budget of pgd, aa and aa-apgd in [0, 1] pixel units (default 8/255)")
    e.add_argument("--pgd-steps", help="PGD steps (default 20)")
    e.add_argument("--workers", help="evaluation actors (default 1)")
    e.add_argument("--gpu", action="store_const", const="true", help="one GPU per actor")
    e.add_argument("--name", help="job name; rerunning a name resumes it (computes only missing shards)")
    e.add_argument("--out", help="results folder (default $RAYRCM_STORAGE/evaluate, else ./rayrcm_results/evaluate)")
    e.add_argument("--tracking-uri",
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    e.add_argument("--experiment", help="MLflow experiment (default: the model's)")
    e.add_argument("--plugin", action="append", metavar="MODULE|FILE.py",
                   help="import this module or .py file first, in the driver and every actor (repeatable)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any EvaluateConfig key, e.g. --set tracking.enabled=false --set aa_iters=50")


def _compare_parser(sub) -> None:
    k = _sub(sub, "compare",
             "a paper's table, one row per model: SA/PGD/AA/CS-s, C and shifted sets, certified accuracy, ACR")
    k.add_argument("results", nargs="+", metavar="RUN_OR_DIR", help="result folders or MLflow run ids")
    k.add_argument("--latex", action="store_true", help="print (and write, with --out) the LaTeX table too")
    k.add_argument("--out", help="write the Markdown table to this file (LaTeX next to it as .tex with --latex)")
    k.add_argument("--radii",
                   help="comma-separated radii of the certified table (default 0, 0.25, ... to each run's reach)")
    k.add_argument("--per-class", action="store_true",
                   help="beside each column, the worst class's number ('worst SA', 'worst r=0.50', 'worst ACR')")
    k.add_argument("--tracking-uri",
                   help="MLflow tracking URI for run ids (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")


def _export_parser(sub) -> None:
    o = _sub(sub, "export", "a registered model as an ONNX graph (normalisation inside), checked with onnxruntime")
    o.add_argument("model", metavar="MODEL",
                   help="models:/name@alias, models:/name/<version>, a run id, runs:/<id>/model or a model.pt path")
    o.add_argument("--format", default="onnx", help="onnx (the only format)")
    o.add_argument("--out", help="default <name>-<alias>.onnx, <run id>.onnx or <folder>.onnx")
    o.add_argument("--check", type=int, default=64, help="images compared with PyTorch (default 64)")
    o.add_argument("--opset", type=int, help="ONNX opset (default 18)")
    o.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    x = _sub(sub, "export-results", "evaluation results as RobustBench model cards (clean, AutoAttack, corruptions, mCE)")
    x.add_argument("results", nargs="+", metavar="RUN_OR_DIR", help="evaluation folders or MLflow run ids")
    x.add_argument("--format", default="robustbench", help="robustbench (the only format)")
    x.add_argument("--name", default="", help="the model's name in the card and its file (default: the model's)")
    x.add_argument("--architecture", default="", help="e.g. WideResNet-28-10 (RobustBench shows it)")
    x.add_argument("--dataset", default="", help="RobustBench's dataset name when rayrcm's is not one: cifar10, cifar100, "
                                                 "imagenet")
    x.add_argument("--out", default="robustbench", help="folder of the cards, laid out as RobustBench's model_info/")
    x.add_argument("--tracking-uri",
                   help="MLflow tracking URI for run ids (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", action="append", default=[], metavar="KEY=SPEC",
                   help="a swept key: grid:a,b,c | choice:a,b | uniform:lo,hi | loguniform:lo,hi | randint:lo,hi")
    p.add_argument("--sweep", dest="sweep", action="append", default=[], metavar="KEY=VALUE",
                   help="sweep settings, e.g. --sweep num_samples=2 --sweep max_concurrent_trials=4 --sweep alias=NAME "
                        "(default: the sweep's name; --sweep move_alias=true moves an alias another job set)")


def add_verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show Ray's and MLflow's own logs too (also: RAYRCM_VERBOSE=1)")


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="rayrcm", description="Robust representation learning and certification on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    q = _sub(sub, "quickstart", "RCM pretrain + noisy fine-tune + certification on the bundled digits")
    t = _sub(sub, "train", "run one training stage of a recipe on Ray Train")
    c = _sub(sub, "config", "print the resolved config of a recipe: every key and its value")
    w = _sub(sub, "tune", "sweep config keys with Ray Tune (each trial a Ray Train run, ASHA, MLflow parent/child)")
    add_sweep_args(w)
    for sp in (t, c, w):
        sp.add_argument("recipe", help="a .py (config() or CONFIG) or .yaml recipe")
    for sp in (q, t, c, w):
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=2e-4 (repeatable); "
                             "list the keys: rayrcm config RECIPE")
    _certify_parser(sub, "certify", "randomized-smoothing CERTIFY over a test set, sharded with Ray Data")
    _certify_parser(sub, "predict", "randomized-smoothing PREDICT (abstaining prediction) over a test set")
    _evaluate_parser(sub)
    a = _sub(sub, "analyze", "certified accuracy, ACR, tables and curves from certification results")
    a.add_argument("results", nargs="+", help="certification folders or Cohen-format .tsv files")
    a.add_argument("--radii", help="comma-separated radii (default 0, 0.25, ..., 2.0 and beyond as needed, never past the "
                                   "largest radius the protocol can certify)")
    a.add_argument("--out", help="folder for table.md, table.tex, certified_accuracy.png")
    a.add_argument("--per-class", action="store_true", help="print certified accuracy and ACR per true class too, "
                                                            "with the worst class (always written to per_class.md)")
    a.add_argument("--no-log", action="store_true", help="do not log to the certifications' MLflow runs")
    a.add_argument("--tracking-uri", help="your MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db): "
                                          "the analysis is logged only to runs on it, never to a server a folder names")
    _compare_parser(sub)
    _export_parser(sub)
    m = _sub(sub, "mlflow-server", "the MLflow tracking server of a cluster's head (basic auth on by default)")
    m.add_argument("--backend-store-uri", default="sqlite:///mlflow.db", help="sqlite:////abs/mlflow.db or postgresql://...")
    m.add_argument("--artifacts-destination", default="./mlartifacts", help="s3://bucket/prefix, gs://... or a folder")
    m.add_argument("--host", default="127.0.0.1", help="0.0.0.0 on a cluster head (reachable inside the cluster only)")
    m.add_argument("--port", type=int, default=5000)
    m.add_argument("--workers", type=int, default=2)
    m.add_argument("--allowed-hosts", default="", help="Host headers to accept (default: MLflow's, localhost and private IPs)")
    m.add_argument("--no-auth", action="store_true", help="no basic auth (refused unless --host is loopback)")
    m.add_argument("--state-dir", default="~/.rayrcm/mlflow", help="auth database, session secret, auth config")
    m.add_argument("--detach", action="store_true", help="start in the background, wait until healthy, print the pid")
    m.add_argument("--log", default="~/.rayrcm/mlflow/server.log")
    m.add_argument("--pidfile", default="")
    m.add_argument("--stop-with-ray", action="store_true", help="with --detach: stop once this host's Ray stops (ray down)")
    for parser in (p, *sub.choices.values()):
        add_verbose_arg(parser)
    return p


def certify_config(args: argparse.Namespace):
    """The :class:`~rayrcm.certify.CertifyConfig` of a parsed ``certify``/``predict`` command line."""
    from rayrcm.orchestration import certify_job

    items = [f"mode={args.command}"]
    check_sampling_flags({f: getattr(args, f) for f in CERTIFY_FLAGS if getattr(args, f, None) is not None})
    for flag, key in CERTIFY_FLAGS.items():
        value = getattr(args, flag, None)
        if isinstance(value, list):  # a repeatable flag: the dotted parser reads tuples comma separated
            value = ",".join(value)
        if value is not None:
            items.append(f"{key}={value}")
    return certify_job.config_from_args(items + args.overrides)


def _certify(args: argparse.Namespace) -> int:
    from rayrcm.orchestration import certify_job

    certify_job.run(certify_config(args))
    return 0


def evaluate_config(args: argparse.Namespace):
    """The :class:`~rayrcm.orchestration.evaluate_job.EvaluateConfig` of a parsed ``evaluate`` command line."""
    from rayrcm.orchestration import evaluate_job

    items = []
    for flag, key in EVALUATE_FLAGS.items():
        value = getattr(args, flag, None)
        if isinstance(value, list):
            value = ",".join(value)
        if value is not None:
            items.append(f"{key}={value}")
    return evaluate_job.config_from_args(items + args.overrides)


def _evaluate(args: argparse.Namespace) -> int:
    from rayrcm.orchestration import evaluate_job

    evaluate_job.run(evaluate_config(args))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from rayrcm.orchestration import certify_job

    certify_job.analyze(args.results, radii=_radii(args.radii), out=args.out, log=not args.no_log, tracking_uri=args.tracking_uri,
                        per_class=args.per_class)
    return 0


def _radii(text: str | None) -> list[float] | None:
    try:
        return [float(r) for r in text.split(",") if r.strip()] if text else None
    except ValueError:
        raise ConfigError("radii", text, "comma-separated numbers, e.g. 0,0.25,0.5") from None


def _compare(args: argparse.Namespace) -> int:
    from rayrcm.orchestration.analyze import compare

    compare(args.results, latex=args.latex, out=args.out, radii=_radii(args.radii), tracking_uri=args.tracking_uri,
            per_class=args.per_class)
    return 0


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from rayrcm.orchestration import console

    console.configure(True if getattr(args, "verbose", False) else None)  # before anything imports ray
    if args.command in ("certify", "predict"):
        return _certify(args)
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "analyze":
        return _analyze(args)
    if args.command == "compare":
        return _compare(args)
    if args.command == "export":
        from rayrcm.orchestration.export_model import export_model

        export_model(args.model, fmt=args.format, out=args.out, opset=args.opset, check=args.check,
                     tracking_uri=args.tracking_uri, verbose=bool(getattr(args, "verbose", False)))
        return 0
    if args.command == "export-results":
        from rayrcm.orchestration.analyze import export_results

        export_results(args.results, fmt=args.format, out=args.out, name=args.name, architecture=args.architecture,
                       dataset=args.dataset, tracking_uri=args.tracking_uri)
        return 0
    if args.command == "mlflow-server":
        from rayrcm.orchestration import mlflow_server as ms

        spec = ms.ServerSpec(args.backend_store_uri, args.artifacts_destination, host=args.host, port=args.port,
                             workers=args.workers, auth=not args.no_auth, state_dir=args.state_dir,
                             allowed_hosts=args.allowed_hosts)
        return ms.serve(spec, detach=args.detach, log=args.log, pidfile=args.pidfile, stop_with_ray_=args.stop_with_ray)
    from rayrcm.config import apply_overrides, load_recipe, to_dict, validate

    if args.command == "quickstart":
        from rayrcm import quickstart

        quickstart.run(args.overrides)
        return 0
    # `rayrcm config` lists the keys before any data is on disk: paths are checked when a stage runs
    cfg = validate(apply_overrides(load_recipe(args.recipe), args.overrides), check_paths=args.command != "config")
    if args.command == "tune":
        from rayrcm.orchestration import sweep

        sweep.run(cfg, sweep.config_from_args(args.sweep, args.space))
        return 0
    if args.command == "config":
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from rayrcm.orchestration.trainer import fit

    result = fit(cfg)
    where = result.model.get("alias_uri") or result.model.get("registry_uri") or result.model_file
    print(f"[rayrcm] model: {where}" + (f" (MLflow run {result.run_id})" if result.run_id else ""))
    return 0


def main(argv: list[str] | None = None) -> None:
    """``rayrcm ARGV``: exit 2 on bad input, 1 on a failed run, 130 on Ctrl-C, each one line."""
    with one_line_errors():
        code = run(argv)
    sys.exit(code)


if __name__ == "__main__":
    main()
