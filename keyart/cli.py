"""The ``keyart`` command line: a thin dispatcher over the stage modules.

Each command lives in the module that owns it and is imported only when used, so
``keyart serve`` never imports Spark and ``keyart --help`` stays fast. A command module
exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "world": ("keyart.sim.world", "create a simulated world: catalog, members, viewing history"),
    "traffic": ("keyart.sim.traffic", "simulate one day of visits against a policy or the endpoint"),
    "job": ("keyart.jobs.chain", "run a Spark job (ingest, rewards, features, priors) for one ds"),
    "spark-connect": ("keyart.jobs.connect_server", "run a Spark Connect server the jobs can share (KEYART_SPARK_REMOTE)"),
    "train": ("keyart.models.train", "train the reward model for one ds"),
    "evaluate": ("keyart.models.evaluate", "offline policy evaluation (replay, IPS, SNIPS, DR) for one ds"),
    "ope": ("keyart.models.offline", "value a target policy on any impression log or Open Bandit Dataset CSV"),
    "obd": ("keyart.models.obd", "map an Open Bandit Dataset CSV onto the rewards contract under a lake"),
    "export": ("keyart.models.export", "export the ONNX bundle with a parity check"),
    "register": ("keyart.models.register", "log the run and register the bundle in MLflow"),
    "gate": ("keyart.models.gate", "promotion gate: challenger -> champion if it wins"),
    "promote": ("keyart.models.promote", "make a registered version the champion (reviewer override)"),
    "rollback": ("keyart.models.rollback", "restore the previous champion"),
    "serve": ("keyart.serving.app", "run the artwork-selection HTTP endpoint"),
    "bench": ("keyart.bench", "benchmarks: jobs, learning, serving, loop"),
    "demo": ("keyart.demo.loop", "the closed loop on embedded defaults, with a report"),
    "stack": ("keyart.demo.stack", "the production topology on this machine: up, down, status (make up / make down)"),
}


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(prog="keyart", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser, sub


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, _ = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    verbose = False
    while argv and argv[0] in ("-v", "--verbose"):
        verbose = True
        argv.pop(0)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        parser.error(f"unknown command {command!r}; choose from {', '.join(COMMANDS)}")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module_name, help_text = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"keyart {command}: not available in this build ({module_name} is missing)", file=sys.stderr)
            return 2
        raise
    sub = argparse.ArgumentParser(prog=f"keyart {command}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
