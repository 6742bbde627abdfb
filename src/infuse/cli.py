"""The ``infuse`` command: a table of subcommands, each a thin call into one module."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape

from infuse import __version__
from infuse.config import describe_keys
from infuse.demo import DemoSettings
from infuse.errors import InfuseError
from infuse.world import VOCABULARIES

console = Console()
err_console = Console(stderr=True)


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from infuse.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(
        args.corpus, args.vocab_size, args.output, text_field=args.text_field, max_token_length=args.max_token_length
    )
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
    import torch.distributed as dist

    from infuse.config import load_config
    from infuse.train import run

    run(load_config(args.config, args.overrides), console)
    if dist.is_initialized():  # opened for torchrun's processes; NCCL warns at exit about one left open
        dist.destroy_process_group()


def cmd_preflight(args: argparse.Namespace) -> None:
    from infuse.config import load_config
    from infuse.preflight import preflight

    ok = preflight(load_config(args.config, args.overrides), console)
    if not ok:
        raise SystemExit(2)  # like any problem the user can fix (InfuseError)


def cmd_merge(args: argparse.Namespace) -> None:
    from infuse.merge import merge

    merge(args.adapter, args.output, args.base, device=args.device, into=args.merge_into, console=console)


def cmd_serve(args: argparse.Namespace) -> None:
    import dataclasses

    from infuse.serve.options import ServeOptions
    from infuse.serve.registry import parse_model_specs

    models = parse_model_specs(args.model)
    options = ServeOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeOptions)})
    if args.engine == "vllm":
        from infuse.serve.vllm import run_vllm

        sys.exit(run_vllm(models, options, console))
    from infuse.serve import serve_forever

    serve_forever(models, options, console)


def cmd_chat(args: argparse.Namespace) -> None:
    from infuse.chat import chat

    chat(args.spec, console, system=args.system, max_new_tokens=args.max_new_tokens,
         temperature=args.temperature, top_p=args.top_p, seed=args.seed, device=args.device, dtype=args.dtype)


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """One flag per ServeOptions field (--max-batch-size for max_batch_size), its help from the field."""
    import dataclasses
    import os

    from infuse.serve.options import ServeOptions

    for field in dataclasses.fields(ServeOptions):
        flag, text = "--" + field.name.replace("_", "-"), field.metadata["help"]
        if isinstance(field.default, bool):
            parser.add_argument(flag, action="store_true", help=text)
        elif field.name == "api_key":
            parser.add_argument(flag, default=os.environ.get("INFUSE_API_KEY"), help=text)
        else:
            kind = type(field.default) if field.default is not None else str
            parser.add_argument(flag, type=kind, default=field.default,
                                help=f"{text} (default {field.default})")


def cmd_eval(args: argparse.Namespace) -> None:
    from infuse.evaluate import EvalSettings, GenerationSettings, evaluate
    from infuse.evaluate.report import print_summary

    settings = EvalSettings(
        generation=GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p, seed=args.seed),
        batch_size=args.batch_size, block_size=args.block_size, heldout_max_blocks=args.heldout_max_blocks,
        dtype=args.dtype, device=args.device,
        api_key=args.api_key, timeout=args.timeout, lm_eval_tasks=_task_list(args.lm_eval),
        lm_eval_include=args.lm_eval_include, lm_eval_limit=args.lm_eval_limit,
    )
    report = evaluate(_named(args.model, "--model"), args.probes, args.output, settings,
                      modes=_named(args.only or [], "--only"), heldout=args.heldout, runs=args.runs,
                      gates=args.fail_if, console=console)
    print_summary(report, console)
    failed = [gate for gate in report["gates"] if gate["failed"]]
    for gate in report["gates"]:
        names = ", ".join(f"{k} = {v:.6g}" for k, v in gate["values"].items())
        line = f"{gate['condition']}  [{gate['left']:.6g} vs {gate['right']:.6g}; {names}]"
        if gate["failed"]:
            err_console.print(f"[bold red]gate failed:[/bold red] {line}", highlight=False)
        else:
            console.print(f"gate ok: {line}", highlight=False)
    if failed:
        raise SystemExit(3)


def _named(pairs: list[str], flag: str) -> dict[str, str]:
    """``["NAME=VALUE", ...]`` → ``{NAME: VALUE}``, refusing pairs without a name and repeated names."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise InfuseError(f"{flag} {pair}: expected NAME=VALUE, e.g. {flag} chat=out/chat+out/adapter.")
        if name in out:
            raise InfuseError(f"{flag}: the name {name} is given twice; every model needs its own name.")
        out[name] = value
    return out


def _task_list(text: str | None) -> list[str]:
    return [task.strip() for task in (text or "").split(",") if task.strip()]


def cmd_probes_make(args: argparse.Namespace) -> None:
    from infuse.evaluate import make_probes, write_probes

    probes = make_probes(args.documents, max_probes=args.max, group=args.group, text_field=args.text_field)
    if not probes:
        raise InfuseError(f"No sentence of {', '.join(args.documents)} ends in a name or a number, so "
                          "there is nothing to make cloze probes from. Write probes by hand (README: Probes and "
                          "world folders).")
    write_probes(probes, args.output)
    console.print(f"Wrote {len(probes)} cloze probes (group {args.group}) to [bold]{args.output}[/bold].")


def cmd_demo(args: argparse.Namespace) -> None:
    from infuse.demo import run_demo

    run_demo(output=args.output, quick=args.quick, world=args.world, base=args.base, chat=args.chat,
             seed=args.seed, families=args.families, vocabulary=args.vocabulary, train_seed=args.train_seed,
             console=console)


TEXT_FIELD_HELP = "text field of JSON/JSONL/Parquet rows (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infuse", description="Teach a causal language model new knowledge and show what it gained "
        "and what it lost. `infuse COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"infuse {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tok = commands.add_parser("tokenizer", help="tokenizer tools")
    tok = tok.add_subparsers(dest="action", required=True)
    train_tok = tok.add_parser("train", help="train a byte-level BPE tokenizer",
                               description="Train a byte-level BPE tokenizer and save it as a transformers "
                                           "tokenizer dir with a ChatML chat template.")
    train_tok.add_argument("--corpus", nargs="+", required=True, help="text, JSONL, JSON or Parquet files")
    train_tok.add_argument("--vocab-size", type=int, required=True, help="entries in the vocabulary")
    train_tok.add_argument("--output", required=True, help="tokenizer directory to write")
    train_tok.add_argument("--text-field", default="text", help=TEXT_FIELD_HELP)
    train_tok.add_argument("--max-token-length", type=int, help="longest merged token, in characters")
    train_tok.set_defaults(func=cmd_tokenizer_train)

    ing = commands.add_parser("ingest", help="web pages and documents → documents.jsonl",
                              description="Fetch web pages and read documents (HTML, PDF, Markdown, text, "
                                          "JSON/JSONL/Parquet rows) into clean text in one documents.jsonl; "
                                          "every source skipped or failed is reported.")
    ing.add_argument("sources", nargs="+", metavar="SOURCE", help="URL, file, folder, glob or @list.txt")
    ing.add_argument("--output", "-o", required=True, help="documents.jsonl to write")
    ing.add_argument("--text-field", default="text", help=TEXT_FIELD_HELP)
    ing.add_argument("--timeout", type=float, default=20.0, help="seconds per HTTP request (default %(default)s)")
    ing.add_argument("--retries", type=int, default=2,
                     help="retries of a failed connection or a 429/5xx answer (default %(default)s)")
    ing.add_argument("--user-agent", default=None, help="User-Agent header (default: infuse/VERSION)")
    ing.add_argument("--max-bytes", type=int, default=20_000_000,
                     help="largest download in bytes (default %(default)s)")
    ing.add_argument("--strict", action="store_true", help="stop at the first failing source")
    ing.set_defaults(func=cmd_ingest)

    for name, func, text in (("train", cmd_train, "one training run"),
                             ("preflight", cmd_preflight, "check data, template and tokenizer")):
        description = textwrap.fill(f"{text[0].upper()}{text[1:]} from a YAML recipe; `--key value` after it "
                                    "overrides any config key, every TrainingArguments field included.", 78)
        sub = commands.add_parser(name, help=text, description=description, epilog=describe_keys(),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("config", nargs="?", help="YAML recipe")
        sub.set_defaults(func=func, takes_overrides=True)

    mrg = commands.add_parser("merge", help="fold a LoRA/QLoRA adapter into its base, checked",
                              description="Fold a LoRA or QLoRA adapter into its base model and save a "
                                          "standalone model, kept only if its logits match base+adapter.")
    mrg.add_argument("--adapter", required=True, help="adapter dir (a lora or qlora run's output_dir)")
    mrg.add_argument("--base", default=None, help="base model dir (default: the one the run recorded)")
    mrg.add_argument("--output", "-o", required=True, help="new dir for the merged model")
    mrg.add_argument("--device", default=None, help="cpu, cuda, ... (default: the GPU when there is one)")
    mrg.add_argument("--merge-into", choices=["dequantized", "original"], default="dequantized",
                     help="QLoRA: merge into the dequantized 4-bit base the adapter was trained on "
                          "(default), or into the original weights")
    mrg.set_defaults(func=cmd_merge)

    srv = commands.add_parser("serve", help="HTTP server (TGI and OpenAI routes) for models and adapters",
                              description="Serve models and adapters side by side over TGI- and "
                                          "OpenAI-compatible HTTP routes, batching concurrent requests.")
    srv.add_argument("--model", action="append", required=True, metavar="NAME=PATH[+ADAPTER]",
                     help="a model to serve; repeat for more (adapters on one base share it)")
    srv.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                     help="the built-in batching engine, or hand the models to vLLM")
    add_serve_options(srv)
    srv.set_defaults(func=cmd_serve)

    cht = commands.add_parser("chat", help="chat with a model in the terminal",
                              description="Chat with a model (or base+adapter) in the terminal, in its chat "
                                          "template.")
    cht.add_argument("spec", metavar="PATH[+ADAPTER]", help="a model dir, or a base model dir + an adapter dir")
    cht.add_argument("--system", default=None, help="system prompt")
    cht.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default %(default)s)")
    cht.add_argument("--temperature", type=float, default=0.7,
                     help="default %(default)s; at or below 0.01 decoding is greedy")
    cht.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default %(default)s)")
    cht.add_argument("--seed", type=int, default=None, help="seed for sampled decoding")
    cht.add_argument("--device", default=None, help="cpu, cuda, ... (default: the GPU when there is one)")
    cht.add_argument("--dtype", default="auto", help="auto (as saved) | float32 | bfloat16 | float16")
    cht.set_defaults(func=cmd_chat)

    ev = commands.add_parser("eval", help="compare models on probes, perplexity and chat format → report",
                             description="Compare models on probes; writes report.json, .md and .html.")
    ev.add_argument("--model", action="append", required=True, metavar="NAME=PATH[+ADAPTER]|NAME=URL",
                    help="a model dir (with an adapter after '+') or a server URL (http://host:port[/v1|/generate]"
                         "[#served-model]); repeat for each model")
    ev.add_argument("--probes", required=True, help="probes.jsonl, one probe a line (README: Probes and world folders)")
    ev.add_argument("--output", "-o", required=True, help="folder for report.json, report.md, report.html")
    ev.add_argument("--only", action="append", metavar="NAME=chat|completion",
                    help="ask model NAME only probes of this mode (default: every model gets every probe)")
    ev.add_argument("--heldout", nargs="+", default=[], metavar="FILE",
                    help="held-out text (.txt lines, .md, .jsonl/.json/.parquet rows) for perplexity")
    ev.add_argument("--runs", nargs="+", default=[], metavar="DIR", help="training output dirs: loss curves")
    ev.add_argument("--max-new-tokens", type=int, default=200, help="longest answer in tokens (default %(default)s)")
    ev.add_argument("--temperature", type=float, default=0.01, help="at or below 0.01 decoding is greedy")
    ev.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default %(default)s)")
    ev.add_argument("--seed", type=int, default=0, help="seed for sampled decoding")
    ev.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    ev.add_argument("--block-size", type=int, default=512, help="tokens per held-out block")
    ev.add_argument("--heldout-max-blocks", type=int, default=None, help="perplexity on N blocks at most")
    ev.add_argument("--dtype", default=None, help="local weights dtype (default: as saved)")
    ev.add_argument("--device", default=None, help="local device (default: cuda when available)")
    ev.add_argument("--api-key", default=None, help="bearer token for endpoints (default: $INFUSE_API_KEY)")
    ev.add_argument("--timeout", type=float, default=300.0, help="seconds per endpoint answer")
    ev.add_argument("--lm-eval", default=None, metavar="TASKS", help="comma-separated lm-eval tasks")
    ev.add_argument("--lm-eval-include", default=None, metavar="DIR", help="folder of lm-eval task YAMLs")
    ev.add_argument("--lm-eval-limit", type=float, default=None, help="examples per lm-eval task")
    ev.add_argument("--fail-if", action="append", default=[], metavar="CONDITION",
                    help="exit 3 when it holds, e.g. 'chat_ft.old.accuracy < 0.95 * chat.old.accuracy'")
    ev.set_defaults(func=cmd_eval)

    probes = commands.add_parser("probes", help="probe tools").add_subparsers(dest="action", required=True)
    make = probes.add_parser("make", help="cloze probes from documents",
                             description="Write cloze probes from documents: a sentence that ends in a name "
                                         "or a number, cut before it, is the prompt; the cut-off words are "
                                         "the answer.")
    make.add_argument("documents", nargs="+", metavar="DOCS", help="documents.jsonl (infuse ingest) or text")
    make.add_argument("--output", "-o", required=True, help="probes.jsonl to write")
    make.add_argument("--max", type=int, default=None, help="at most this many probes")
    make.add_argument("--group", default="new", help="group name of the probes (default: new)")
    make.add_argument("--text-field", default="text", help=TEXT_FIELD_HELP)
    make.set_defaults(func=cmd_probes_make)

    demo = commands.add_parser("demo", help="the whole experiment end to end on CPU",
                               description="The whole four-model experiment end to end on the CPU, nothing "
                                           "downloaded: pretrain a base model, fine-tune a chat model, infuse "
                                           "both with new pages, then serve and compare all four.")
    demo.add_argument("--output", default="out/demo", help="folder for every stage's output (reused on a rerun)")
    demo.add_argument("--quick", action="store_true",
                      help="shorter training, a smoke test of every stage (1.5 to 3 minutes); the infused models "
                           "learn less")
    demo.add_argument("--world", default=None, metavar="DIR",
                      help="a world folder of your own (pretrain.jsonl, sft.jsonl, news/, probes.jsonl)")
    demo.add_argument("--base", default=None, metavar="PATH", help="your base model: skips pretraining")
    demo.add_argument("--chat", default=None, metavar="PATH", help="your chat model: skips fine-tuning")
    demo.add_argument("--seed", type=int, default=0, help="seed of the generated world")
    demo.add_argument("--train-seed", type=int, default=None,
                      help=f"seed of every training stage (default {DemoSettings.train_seed}); with --base and --chat, "
                           "of the infusions")
    demo.add_argument("--families", type=int, default=48, help="old instance families of the generated world")
    demo.add_argument("--vocabulary", default="birds", choices=sorted(VOCABULARIES),
                      help="words the generated world names its accelerators with")
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


def launched_process() -> str:
    """' (process 1 of 2)' under torchrun, else '': every process meets the same bad input, and each
    says so, which reads as one error repeated unless each names itself."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f" (process {os.environ.get('RANK', '0')} of {world})" if world > 1 else ""


def run_command(func: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> None:
    """Run a subcommand; a user-fixable problem is one paragraph on stderr, not a traceback."""
    from infuse.logs import library_bars_only_in_a_terminal, quiet_libraries

    quiet_libraries(debug=args.debug)
    library_bars_only_in_a_terminal()
    try:
        func(args)
    except InfuseError as e:
        if args.debug:
            raise
        err_console.print(f"[bold red]error{launched_process()}:[/bold red] {escape(str(e))}",
                          highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as e:
        if args.debug:
            raise
        err_console.print(f"[bold red]error{launched_process()}:[/bold red] {type(e).__name__}: {escape(str(e))}\n"
                          "(run with --debug for the traceback)", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
