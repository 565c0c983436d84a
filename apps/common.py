"""Flags and helpers shared by the CLI subcommands: model loading, session limits, sampling, stats."""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

# streaming.runtime.DEFAULT_MAX_NEW_TOKENS, for --help without importing torch (a test keeps them equal).
RUNTIME_DEFAULT_MAX_NEW_TOKENS = 256


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags that choose the model and the session's constant-size cache."""
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=None, metavar="PATH",
                   help="checkpoint directory (Hugging Face layout); default: the bundled model")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="weight/activation dtype (default: bfloat16 on GPU; on CPU float32, or bfloat16 "
                        "for a checkpoint saved in it when the CPU has native bfloat16, as the bundled "
                        "model on AVX-512-BF16 / AMX CPUs)")
    g.add_argument("--sinks", type=int, default=4, help="attention-sink slots kept forever (default 4)")
    g.add_argument("--window", type=int, default=1020, help="rolling-window slots (default 1020)")
    g.add_argument("--chunk", type=int, default=None,
                   help="tokens per ingestion step, at most the window (default min(256, window))")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the layers through torch.compile: on a GPU, with CUDA graphs, batch-1 "
                        "decode measured 1.45x faster, after seconds of compiling per new step shape "
                        "(default: on for `serve` on a GPU, where a minute of compiling at start "
                        "pays back; off otherwise, and on CPU it is slower)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for tensor ops (default: $OMP_NUM_THREADS if set, else "
                        "automatic: 1 for models under 100M parameters, whose steps slow down "
                        "badly on more threads whenever another process is busy; else every CPU "
                        "this process may use but one)")


def check_model_args(args: argparse.Namespace) -> None:
    """Reject impossible cache and thread flags before anything slow (model load, stdin) runs."""
    from cache import CacheConfigError, check_chunk, check_sink_window

    try:
        check_sink_window(args.sinks, args.window)
    except CacheConfigError as e:
        raise SystemExit(f"error: bad cache flags --sinks {args.sinks} --window {args.window}: {e}") from None
    try:
        if args.chunk is not None:
            check_chunk(args.chunk, args.window)
    except CacheConfigError:
        raise SystemExit(f"error: --chunk must be between 1 and --window ({args.window}), got "
                         f"{args.chunk}: a step evicts to make room for its chunk") from None
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"error: --threads must be >= 1, got {args.threads}")


def add_sampling_args(p: argparse.ArgumentParser, *, generation_length: bool = True) -> None:
    """Sampling, seed, stop strings and (optionally) the reply length flags."""
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", "--temp", type=float, default=None,
                   help="0 = greedy (default: the runtime's default)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="stop string (repeatable); never printed")
    if generation_length:
        n = g.add_mutually_exclusive_group()
        n.add_argument("--max-new-tokens", "-n", type=int, default=None,
                       help="tokens to generate at most (default: the checkpoint's "
                            "generation_config.json max_new_tokens, 200 for the bundled model; "
                            f"{RUNTIME_DEFAULT_MAX_NEW_TOKENS} when it has none)")
        n.add_argument("--unbounded", action="store_true",
                       help="generate until EOS, a stop string or Ctrl-C (constant memory)")


# Sampling flags and the SamplingParams fields they set.
SAMPLING_FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
                  "repetition_penalty": "--repetition-penalty", "seed": "--seed"}
# torch.Generator.manual_seed takes seeds in [-2**63, 2**64).
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_sampling_args(args: argparse.Namespace) -> None:
    """Reject impossible sampling flags and reply lengths before the model loads (and before a
    document is read): the same rules the runtime applies to each reply, checked once up front."""
    if hasattr(args, "unbounded") and args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise SystemExit("error: --max-new-tokens must be >= 1 (use --unbounded for no limit)")
    if not hasattr(args, "temperature"):
        return  # a command without sampling flags (serve)
    from streaming.errors import InvalidInputError
    from streaming.sampling import SamplingParams

    for name, flag in SAMPLING_FLAGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        try:
            SamplingParams(**{name: value}).validate()
        except InvalidInputError as e:
            raise SystemExit(f"error: bad {flag}: {e}") from None
    if args.seed is not None and not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise SystemExit(f"error: --seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {args.seed}")
    for stop in args.stop or ():
        if not stop:
            raise SystemExit("error: --stop needs a non-empty string")


def sampling_kwargs(args: argparse.Namespace, rt) -> dict:
    """The generate()/chat() keyword arguments from parsed flags (None = runtime default)."""
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed)
    if hasattr(args, "unbounded"):
        kw["max_new_tokens"] = max_new_tokens(args, rt)
    kw = {k: v for k, v in kw.items() if v is not None or k == "max_new_tokens"}
    # The flags merged with the checkpoint's defaults, checked once here rather than at every reply.
    from streaming.errors import InvalidInputError

    try:
        rt.sampling_defaults.merged(**{k: v for k, v in kw.items() if k in SAMPLING_FLAGS})
    except InvalidInputError as e:
        raise SystemExit(f"error: sampling settings: {e}") from None
    return kw


def max_new_tokens(args: argparse.Namespace, rt) -> int | None:
    """-n, else the runtime's default reply length; None (unbounded) only with --unbounded."""
    check_sampling_args(args)
    if args.unbounded:
        return None
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    return rt.default_max_new_tokens  # the checkpoint's generation_config.json, else 256


def wants_compile(args: argparse.Namespace, *, serving: bool = False) -> bool:
    """--compile / --no-compile, else `compile_by_default(args.device, serving=serving)`."""
    if getattr(args, "compile", None) is not None:
        return bool(args.compile)
    return compile_by_default(getattr(args, "device", None), serving=serving)


def compile_by_default(device, *, serving: bool) -> bool:
    """Compiled layers when a server runs on a GPU: it lives long enough to repay the compile (about
    a minute at start for the bundled model, every step bucket) with faster steps (H200: batch-1 decode
    1.45x, the 1,000-session server's aggregate 37-43k -> 46k tok/s). A one-off command on a GPU, or
    anything on CPU, runs eager. A bad device answers False here: the load reports it."""
    if not serving:
        return False
    from streaming.errors import SinkstreamError
    from streaming.runtime import resolve_device

    try:
        return resolve_device(device).type == "cuda"
    except SinkstreamError:
        return False


def load_runtime(args: argparse.Namespace, *, serving: bool = False):
    """Load the model once; report bad checkpoints as a one-line error, not a traceback."""
    import streaming
    from streaming.errors import SinkstreamError

    t0 = time.perf_counter()
    try:
        rt = streaming.load(args.model, device=args.device, dtype=args.dtype,
                            compile=wants_compile(args, serving=serving))
    except (SinkstreamError, OSError) as e:
        raise SystemExit(f"error: cannot load model {args.model or '(bundled)'}: {e}") from None
    if getattr(args, "verbose", False):
        eprint(f"[loaded {args.model or 'bundled model'} on {rt.device} ({dtype_name(rt)}) "
               f"in {time.perf_counter() - t0:.2f}s; {getattr(args, 'threads_note', '')}]")
    return rt


def require_tokenizer(rt, command: str) -> None:
    """A one-line error when the checkpoint has no tokenizer: every text command needs one."""
    if rt.tokenizer is None:
        raise SystemExit(f"error: this checkpoint has no tokenizer; `{command}` needs one "
                         "(tokenizer.json or tokenizer.model next to config.json)")


def new_session(rt, args: argparse.Namespace):
    """A session with the flags' cache limits; impossible limits become a clean error."""
    try:
        return rt.session(sinks=args.sinks, window=args.window, chunk=args.chunk)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def eprint(*a, **kw) -> None:
    print(*a, file=sys.stderr, flush=True, **kw)


def dtype_name(rt) -> str:
    return str(rt.dtype).removeprefix("torch.")


def cache_size(rt, stats) -> str:
    """The session's KV memory with its dtype: float32 on CPU takes twice bfloat16's bytes."""
    return f"{stats.cache_bytes / 2**20:.2f} MiB {dtype_name(rt)}"


def stdout_gone() -> int:
    """The reader of stdout went away (`| head`): stop quietly, exit as a shell reports SIGPIPE.

    Further writes, including Python's flush at exit, go to /dev/null instead of raising
    BrokenPipeError ("Exception ignored ..."). Returns 141 = 128 + SIGPIPE.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


def peak_memory(rt) -> str:
    """Peak accelerator memory when on CUDA, else the process's peak RSS."""
    import torch

    dev = str(getattr(rt, "device", "cpu"))
    if dev.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.3f} GiB (cuda)"
    # ru_maxrss is in KiB on Linux.
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.3f} GiB (host RSS)"


class Timer:
    """Prompt and generation throughput of one generate() call (mlx-lm style)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.t_first: float | None = None  # when the first token arrived (prompt done)
        self.prompt_tokens = 0
        self.fed = 0  # prompt tokens fed before the generate() call (a prompt fed in pieces)
        self.generated = 0

    def update(self, resp) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.prompt_tokens = self.fed + resp.prompt_tokens
        self.generated = resp.generated_tokens

    def prompt_tps(self) -> float:
        dt = (self.t_first or time.perf_counter()) - self.t0
        return self.prompt_tokens / dt if dt > 0 else 0.0

    def generation_tps(self) -> float:
        # The first token came with the prompt pass; rate the remaining ones.
        if self.t_first is None or self.generated < 2:
            return 0.0
        dt = time.perf_counter() - self.t_first
        return (self.generated - 1) / dt if dt > 0 else 0.0
