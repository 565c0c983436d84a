"""The `sinkstream` command: generate, stream, chat and serve subcommands."""

from __future__ import annotations

import argparse
import sys

from apps import cmd_chat, cmd_generate, cmd_serve, cmd_stream
from apps.common import check_model_args, check_sampling_args, eprint, stdout_gone
from apps.cpu_dtype import configure_dtype
from apps.stdin_text import repair_text_arguments
from apps.threads import configure_threads, model_dir


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sinkstream",
        description="Constant-memory LLM text streaming: layer-condensed KV cache + attention sinks.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cmd_generate.add_parser(sub)
    cmd_stream.add_parser(sub)
    cmd_chat.add_parser(sub)
    cmd_serve.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    # Flags are checked before anything slow: reading stdin, importing torch, loading the model.
    check_model_args(args)
    check_sampling_args(args)
    repair_text_arguments(args)
    from streaming.errors import SinkstreamError  # (torch is imported by the checks above already)

    try:
        args.threads_note = configure_threads(args)
        args.threads_note += f"; dtype: {configure_dtype(args, model_dir(args.model))}"
        code = args.func(args) or 0
        sys.stdout.flush()  # inside the try: a reader that left shows up here at the latest
        return code
    except KeyboardInterrupt:  # Ctrl-C outside a generation loop (e.g. while loading)
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout's reader went away (`| head`), in any subcommand
        return stdout_gone()
    except OSError as e:  # a write failed: a full disk (ENOSPC) or a broken device under stdout
        return output_failed(e)
    except SinkstreamError as e:  # an error sinkstream raises on purpose that no command caught
        eprint(f"error: {e}")
        return 1


def output_failed(e: OSError) -> int:
    """One `error:` line for a failed write (exit 1). Files the commands open themselves
    (--ppl-jsonl, /save) report their own failures, so one without a file name is stdout's."""
    eprint(f"error: cannot write to {e.filename or 'stdout'}: {e.strerror or e}")
    stdout_gone()  # what is still buffered would fail again at exit, with a traceback
    return 1

if __name__ == "__main__":
    sys.exit(main())
