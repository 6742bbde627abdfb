"""The ``infuse`` command: a table of subcommands, each a thin call into one module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from rich.console import Console

from infuse import __version__
from infuse.errors import InfuseError

console = Console()
err_console = Console(stderr=True)


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from infuse.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(args.corpus, args.vocab_size, args.output, text_field=args.text_field)
    console.print(f"Saved a {len(tokenizer)}-entry byte-level BPE tokenizer to [bold]{args.output}[/bold].")


def cmd_ingest(args: argparse.Namespace) -> None:
    from infuse.ingest import IngestOptions, ingest, print_report

    options = IngestOptions(
        text_field=args.text_field, timeout=args.timeout, retries=args.retries,
        max_bytes=args.max_bytes, strict=args.strict,
        **({"user_agent": args.user_agent} if args.user_agent else {}),
    )
    report = ingest(args.sources, args.output, options, console=console)
    print_report(report, console)


def cmd_train(args: argparse.Namespace) -> None:
    from infuse.config import load_config
    from infuse.train import run

    run(load_config(args.config, args.overrides), console)


def cmd_preflight(args: argparse.Namespace) -> None:
    from infuse.config import load_config
    from infuse.preflight import preflight

    ok = preflight(load_config(args.config, args.overrides), console)
    if not ok:
        raise SystemExit(1)


# >>> merge / serve / chat commands
# <<< merge / serve / chat commands


# >>> eval / probes commands
# <<< eval / probes commands


def cmd_demo(args: argparse.Namespace) -> None:
    from infuse.demo import run_demo

    run_demo(output=args.output, quick=args.quick, console=console)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infuse", description=__doc__)
    parser.add_argument("--version", action="version", version=f"infuse {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tok = commands.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    train_tok = tok.add_parser("train", help="train a byte-level BPE tokenizer")
    train_tok.add_argument("--corpus", nargs="+", required=True, help="text, JSONL, JSON or Parquet files")
    train_tok.add_argument("--vocab-size", type=int, required=True)
    train_tok.add_argument("--output", required=True, help="tokenizer directory to write")
    train_tok.add_argument("--text-field", default="text")
    train_tok.set_defaults(func=cmd_tokenizer_train)

    ing = commands.add_parser("ingest", help="web pages and documents → documents.jsonl")
    ing.add_argument("sources", nargs="+", metavar="SOURCE", help="URL, file, folder, glob or @list.txt")
    ing.add_argument("--output", "-o", required=True)
    ing.add_argument("--text-field", default="text", help="text field of JSON/JSONL/Parquet rows")
    ing.add_argument("--timeout", type=float, default=20.0, help="seconds per HTTP request")
    ing.add_argument("--retries", type=int, default=2)
    ing.add_argument("--user-agent", default=None)
    ing.add_argument("--max-bytes", type=int, default=20_000_000, help="largest download")
    ing.add_argument("--strict", action="store_true", help="stop at the first failing source")
    ing.set_defaults(func=cmd_ingest)

    for name, func, text in (("train", cmd_train, "one training run"),
                             ("preflight", cmd_preflight, "check data, template and tokenizer")):
        sub = commands.add_parser(name, help=text, description=f"{text}; --key value overrides any config key")
        sub.add_argument("config", nargs="?", help="YAML recipe")
        sub.set_defaults(func=func, takes_overrides=True)

    # >>> merge / serve / chat parsers
    # <<< merge / serve / chat parsers

    # >>> eval / probes parsers
    # <<< eval / probes parsers

    demo = commands.add_parser("demo", help="the whole experiment end to end on CPU")
    demo.add_argument("--output", default="out/demo")
    demo.add_argument("--quick", action="store_true")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "takes_overrides", False):
        rest = argv[argv.index(args.command) + 1:]
        args.debug = args.debug or "--debug" in rest
        args.config, args.overrides = split_config_and_overrides([a for a in rest if a != "--debug"])
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    run_command(args.func, args)


def split_config_and_overrides(rest: list[str]) -> tuple[str | None, list[str]]:
    """``CONFIG.yaml --key value ...``; argparse would take an override's value for the config."""
    if rest and not rest[0].startswith("--"):
        return rest[0], rest[1:]
    return None, rest


def run_command(func: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> None:
    """Run a subcommand; a user-fixable problem is one paragraph on stderr, not a traceback."""
    from infuse.logs import quiet_libraries

    quiet_libraries(debug=args.debug)
    try:
        func(args)
    except InfuseError as e:
        if args.debug:
            raise
        err_console.print(f"[bold red]error:[/bold red] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as e:
        if args.debug:
            raise
        err_console.print(f"[bold red]error:[/bold red] {type(e).__name__}: {e}\n"
                          "(run with --debug for the traceback)", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
