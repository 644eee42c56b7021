"""`faceedit` command line: one verb per stage, each living in the module named below.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`. Modules are
imported only when their verb is used, so client verbs start fast and need no PyTorch.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# verb -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("faceedit.demo", "edit a bundled sample photo with the embedded default models (no Triton)"),
    "serve": ("services.gateway.serve", "run the gRPC gateway (embedded onnxruntime backend by default)"),
    "edit": ("faceedit.client", "client: edit a photo through a running gateway"),
    "invert": ("faceedit.client", "client: invert a photo to a latent"),
    "generate": ("faceedit.client", "client: generate an image from a seed or a latent"),
    "interpolate": ("faceedit.client", "client: morph between two latents/photos"),
    "editors": ("faceedit.client", "client: list the attributes, directions and methods served"),
    "conformance": ("faceedit.conformance", "check a published-checkpoint conformance fixture (exit 0 iff within 1e-4)"),
    "export": ("exporters.export", "export a model set to ONNX and write a Triton model repository"),
    "triton": ("exporters.triton", "run the real Triton server on a model repository until SIGTERM"),
    "train": ("faceedit.world.train", "train the default model set on the synthetic face world"),
    "editor-data": ("faceedit.world.editors", "add StyleSpace channels, exemplars and refine checkpoints to a trained model set"),
    "eval": ("faceedit.world.evaluate", "measure inversion and editing quality on held-out rendered faces"),
    "bench": ("bench.run", "latency/throughput of PyTorch, ONNX Runtime and Triton side by side"),
}


def _usage() -> str:
    width = max(len(v) for v in COMMANDS)
    lines = ["usage: faceedit COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `faceedit COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        print(f"faceedit: unknown command {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[verb]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        print(f"faceedit {verb}: not available in this installation ({exc})", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"faceedit {verb}", description=help_)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    if hasattr(module, "add_arguments_for"):
        module.add_arguments_for(verb, parser)  # modules serving several verbs (the client)
    else:
        module.add_arguments(parser)
    args = parser.parse_args(rest)
    args.verb = verb
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
