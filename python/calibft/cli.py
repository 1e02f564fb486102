"""The ``calibft`` command: ``calibft train ...``, ``calibft eval ...``, ``calibft --version``.

Parsers are generated from the config dataclasses (`calibft.config`). User mistakes (ValueError)
print one line on stderr and exit with code 2, without a traceback.

Each command imports what it runs inside its function, so `calibft --version` and
`calibft eval --list` load no torch, transformers or accelerate (tests/test_imports.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from calibft import __version__

USAGE = """usage: calibft {train,eval,doctor} ... | calibft --version

  train   calibration fine-tuning of a causal LM (calibft train --help)
  eval    benchmarks on the base model and adapters (calibft eval --help, calibft eval --list)
  doctor  self-check of this machine: versions, devices, exactness checks (calibft doctor --help)
"""


def train_parser() -> argparse.ArgumentParser:
    from calibft.config import add_flags, describe
    from calibft.train import PRESETS, TrainConfig

    parser = argparse.ArgumentParser(
        prog="calibft train",
        description="Calibration fine-tuning of a causal LM with LoRA (soft or hard targets).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="KEY=VALUE overrides set any config key "
        "(e.g. epochs=1 lr=1e-4 families=gaussian,beta).\n"
        "Precedence: preset < --config file < flags < KEY=VALUE.\n\nconfig keys:\n"
        + describe(TrainConfig),
    )
    parser.add_argument("--config", help="TOML / YAML / JSON file of config keys")
    parser.add_argument(
        "--preset", help=f"recipe preset: {', '.join(PRESETS)} (default: paper-<method>)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in --output"
    )
    plan = parser.add_argument_group("memory plan (docs/plan.md)")
    plan.add_argument(
        "--dry-run",
        action="store_true",
        help="load nothing, train nothing: print the per-GPU memory plan, write OUTPUT/plan.json",
    )
    plan.add_argument(
        "--num-processes", type=int, help="with --dry-run: processes (GPUs) of the planned run"
    )
    plan.add_argument(
        "--strategy",
        help="with --dry-run: single, ddp, fsdp1 or fsdp2 (default: what accelerate launch set, "
        "else single)",
    )
    plan.add_argument(
        "--gpu-memory-gib",
        type=float,
        help="with --dry-run: warn when the peak exceeds this (default: 80)",
    )
    parser.add_argument(
        "--targets",
        action="extend",
        metavar="FILE",
        type=lambda v: [p.strip() for p in v.split(",") if p.strip()],
        help="categorical target file (JSONL, JSON, YAML; shipped:train: the shipped set); "
        "repeatable",
    )
    add_flags(parser, TrainConfig, skip=("targets",))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config key overrides")
    return parser


def run_train(argv: Sequence[str]) -> int:
    from calibft.config import given_flags
    from calibft.train import TrainConfig, load_config, train

    args = train_parser().parse_args(argv)
    config = load_config(
        preset=args.preset,
        config_file=args.config,
        cli=given_flags(args, TrainConfig),
        overrides=args.overrides,
    )
    plan_flags = {
        "strategy": args.strategy,
        "num_processes": args.num_processes,
        "gpu_memory_gib": args.gpu_memory_gib,
    }
    if args.dry_run:
        from calibft.train.plan import dry_run

        _, path = dry_run(config, **{k: v for k, v in plan_flags.items() if v is not None})
        if path is not None:
            print(f"plan written to {path}")
        return 0
    given = [f"--{k.replace('_', '-')}" for k, v in plan_flags.items() if v is not None]
    if given:
        raise ValueError(f"{', '.join(given)} apply only with --dry-run")
    output = train(config, resume=args.resume)
    print(f"adapter saved to {output}")
    return 0


def eval_parser(names: Sequence[str]) -> argparse.ArgumentParser:
    from calibft.config import add_flags, describe
    from calibft.eval import BENCHMARKS, DEFAULT_BENCHMARKS, load_benchmark
    from calibft.eval.config import EvalConfig

    configs = {name: load_benchmark(name).Config for name in names}
    keys = "\n\n".join(
        [f"shared keys:\n{describe(EvalConfig)}"]
        + [f"{name} keys:\n{describe(cls, name + '.')}" for name, cls in configs.items()]
    )
    parser = argparse.ArgumentParser(
        prog="calibft eval",
        description="Run benchmarks on the base model and each LoRA adapter; writes report.json, "
        "report.md and plots. Benchmarks: "
        + ", ".join(BENCHMARKS)
        + f" (default: {' '.join(DEFAULT_BENCHMARKS)}).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="A flag sets that key in every selected benchmark that has it; "
        "KEY=VALUE does the same, BENCH.KEY=VALUE sets one benchmark's key.\n"
        "Precedence: --config file < flags < KEY=VALUE.\n\n" + keys,
    )
    parser.add_argument(
        "benchmarks", nargs="*", metavar="BENCH", help="benchmarks to run, then KEY=VALUE overrides"
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--config", help="TOML / YAML / JSON file of config keys")
    parser.add_argument(
        "--adapter",
        dest="adapters",
        action="append",
        metavar="DIR",
        help="LoRA adapter directory (repeatable)",
    )
    add_flags(parser, EvalConfig)
    for cls in configs.values():
        add_flags(parser, cls)
    return parser


def run_eval(argv: Sequence[str]) -> int:
    from calibft.eval import BENCHMARKS, DEFAULT_BENCHMARKS, benchmark_description, load_benchmark

    if "--list" in argv and not {"-h", "--help"} & set(argv):
        # Before the parser: building it imports the selected benchmarks' modules.
        for name in BENCHMARKS:
            print(f"{name:<14} {benchmark_description(name)}")
        return 0
    from calibft.config import given_flags
    from calibft.eval.config import EvalConfig, resolve
    from calibft.eval.report import headline_table, summary_lines
    from calibft.eval.runner import Ranks, evaluate_rank

    # The benchmarks named on the command line decide which flags exist: find them first.
    words = [w for w in argv if not w.startswith("-") and "=" not in w]
    names = [w for w in words if w in BENCHMARKS] or list(DEFAULT_BENCHMARKS)
    args = eval_parser(names).parse_intermixed_args(argv)
    positional = args.benchmarks
    chosen = [w for w in positional if "=" not in w]
    overrides = [w for w in positional if "=" in w]
    for name in chosen:
        load_benchmark(name)  # unknown names fail here with the list of known ones
    chosen = chosen or list(DEFAULT_BENCHMARKS)
    configs = {name: load_benchmark(name).Config for name in chosen}
    flags = dict(given_flags(args, EvalConfig))
    if args.adapters:
        flags["adapters"] = args.adapters
    for cls in configs.values():
        flags.update(given_flags(args, cls))
    shared, per_bench = resolve(configs, config_file=args.config, flags=flags, overrides=overrides)
    # Under torchrun / accelerate launch each rank evaluates its share; rank 0 reports.
    report = evaluate_rank(shared, per_bench, Ranks.from_env())
    if report is None:
        return 0
    print(Path(shared.output) / "report.md")
    for line in summary_lines(report):
        print(line)
    table = headline_table(report, {name: load_benchmark(name) for name in report["benchmarks"]})
    if table:
        print(table)
    return 0


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def doctor_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calibft doctor",
        description="Self-check before a long job: versions, devices, the attention each family "
        "loads with, and exactness checks on tiny random models of every supported family "
        "(exact pass, fused loss, sampler, train + checkpoint + resume) in float32 and bfloat16. "
        "Downloads nothing; exits 1 when a check fails (docs/doctor.md).",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), help="where to run (default: cuda when present)"
    )
    parser.add_argument("--dtype", type=_names, help="float32,bfloat16 (default: both)")
    parser.add_argument("--family", type=_names, help="families to check (default: all)")
    parser.add_argument("--check", type=_names, help="checks to run (default: all)")
    parser.add_argument("--output", metavar="FILE", help="also write the results as JSON")
    return parser


def run_doctor(argv: Sequence[str]) -> int:
    import torch

    from calibft import doctor

    args = doctor_parser().parse_args(argv)
    options = {"dtypes": args.dtype, "families": args.family, "only": args.check}
    return doctor.run(
        args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        output=Path(args.output) if args.output else None,
        **{k: v for k, v in options.items() if v},
    )


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "train": run_train,
    "eval": run_eval,
    "doctor": run_doctor,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--version":
        print(f"calibft {__version__}")
        return 0
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if args else sys.stderr, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        choices = ", ".join(COMMANDS)
        print(f"calibft: error: unknown command {command!r}; choose {choices}", file=sys.stderr)
        return 2
    # Our own messages at INFO (or $CALIBFT_LOG_LEVEL); libraries stay at WARNING.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )
    logging.getLogger("calibft").setLevel(os.environ.get("CALIBFT_LOG_LEVEL", "INFO").upper())
    try:
        return COMMANDS[command](rest)
    except ValueError as err:
        print(f"calibft {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"calibft {command}: interrupted; finished work is kept "
            "(train: --resume; eval: run it again)",
            file=sys.stderr,
        )
        return 130
