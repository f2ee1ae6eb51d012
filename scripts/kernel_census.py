"""Count the GPU kernels of Memoria's compiled step, on a machine without a GPU.

`Memoria(compile=True)` on a GPU runs each call's device work as the code inductor generates: Triton kernels plus
the ops inductor leaves as calls of their own (top-k, sort, GEMMs, the walk kernel's custom op). At the LM configuration
every one of these kernels is tiny, so under CUDA-graph replay the step's device time is roughly its number of
kernels times a few microseconds: the count is what to shrink. This script makes inductor generate the GPU-style
code (its Triton backend, which schedules and fuses as it does for a GPU) for the CPU, where Triton cannot run,
and prints per call the Triton kernels and the other calls, by name.

How: inductor's Triton backend for the CPU is switched on, Triton's backend query answers an sm_90 target, and
kernel compilation is replaced by a stub, so the generated code is complete but computes nothing. The memory is
first filled eagerly to its steady state (the compiled code depends only on shapes), each device function is then
compiled once on a copy of that state, and the stubs' garbage is thrown away. Relies on torch internals
(torch.utils._triton, torch._inductor.async_compile): a dev tool, not part of the library.

What differs from a real GPU: `Memoria` picks a few paths by device, so the script sets the GPU's choices
(score every slot while the store is at most twice the candidates; order `_top`'s keys by counting inside
compile) and stands in for the Triton walk kernel with an op of its own (one kernel on a GPU). Inductor's
Triton code for the CPU can also differ in detail from its CUDA code (block sizes, a split reduction here and
there), so read the totals as close to the GPU's, not equal.

`--blocks MODEL` counts instead the compiled transformer blocks of a model of `scripts/bench_step.py` (full size,
training mode, two steps: the first segment has no memory, the second has): per compiled graph, forward and
backward; then the modules compiled with the blocks (Memoria GPT-2's memory reader and Abstractor), compiled
alone. On the CPU, scaled-dot-product attention is decomposed into matmuls and a softmax, where a GPU calls its
fused kernel, so read the plain GPT-2 block's attention (and Memoria's under bf16) as larger than on a GPU;
Memoria's float32 memory attentions are written out on both.

Examples:
    python scripts/kernel_census.py                          # the LM configuration, the models' path
    python scripts/kernel_census.py --config enwik8 --list   # every kernel and call by name
    python scripts/kernel_census.py --blocks memoria_gpt2    # Memoria GPT-2's compiled blocks
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import sys
from collections import Counter

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))

import torch  # noqa: E402
from bench_memoria import CONFIGS  # noqa: E402


def generate_gpu_style_code() -> None:
    """Make inductor emit Triton kernels for CPU tensors without building them (see the module docstring)."""
    import torch._inductor.async_compile as async_compile
    import torch._inductor.config as inductor_config
    import torch.utils._triton as triton_utils
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    triton_utils.triton_backend = lambda: backend
    triton_utils.triton_hash_with_backend = lambda: "CENSUS" * 10

    class NoKernel:  # what a launch finds: nothing runs
        def run(self, *args, **kwargs) -> None:
            pass

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    async_compile.AsyncCompile.triton = lambda self, kernel_name, source_code, device_str="cuda": NoKernel()
    inductor_config.cpu_backend = "triton"
    inductor_config.fx_graph_cache = False  # never reuse (or store) code generated this way
    inductor_config.autotune_local_cache = False


@torch.library.custom_op("census::walk", mutates_args=("open_",))
def census_walk(counts: torch.Tensor, src: torch.Tensor, open_: torch.Tensor, hops: int) -> None:
    """Stands for memoria::walk (one Triton kernel on a GPU); computes nothing."""


@census_walk.register_fake
def _census_walk_fake(counts: torch.Tensor, src: torch.Tensor, open_: torch.Tensor, hops: int) -> None:
    return None


class CodeLog(logging.Handler):
    """Collects inductor's output code, one string per compiled graph."""

    def __init__(self) -> None:
        super().__init__()
        self.modules: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "def call(" in message:
            self.modules.append(message)


def census(code: str) -> tuple[Counter, Counter]:
    """(Triton kernels launched, other calls) of one generated module's `call`, by name."""
    body = code[code.index("def call("):]
    kernels = Counter(re.sub(r"_\d+$", "", name) for name in re.findall(r"\b(triton_\w+)\.run\(", body))
    calls = Counter(re.findall(r"\b((?:extern_kernels|torch\.ops\.\w+)\.\w+)(?:\.default)?\(", body))
    calls.pop("torch.ops.inductor._alloc_from_pool", None)  # memory planning, not a kernel
    return kernels, calls


def kind_of(name: str) -> str:
    return name.split("_")[1] if name.startswith("triton_") else name


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="lm")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=40, help="eager steps that fill the store first")
    parser.add_argument("--ltm-capacity", type=int, default=1024, help="fixes the store's size (0: unbounded)")
    parser.add_argument("--two-calls", action="store_true", help="add and remind as two calls (default: one)")
    parser.add_argument("--score-slots", choices=("gpu", "every", "candidates"), default="gpu",
                        help="gpu: as Memoria decides on a GPU")
    parser.add_argument("--list", action="store_true", help="print every kernel and call by name")
    parser.add_argument("--json", help="also write the counts to this file")
    parser.add_argument("--blocks", choices=("memoria_gpt2", "gpt2"), default=None,
                        help="count a model's compiled transformer blocks instead of the memory step")
    parser.add_argument("--tiny", action="store_true", help="with --blocks: the tiny model configs (a smoke run)")
    args = parser.parse_args(argv)
    if args.blocks:
        rows = block_census(args.blocks, args.batch_size or 8, args.tiny)
        return report(rows, args, argv, {"blocks": args.blocks, "tiny": args.tiny})

    import memoria.memoria as memoria_module
    from memoria import Memoria

    cfg = CONFIGS[args.config]
    B = args.batch_size or cfg["batch_size"]
    W, H = cfg["num_memories"], cfg["hidden"]
    memory = Memoria(cfg["num_reminded_stm"], cfg["stm_capacity"], cfg["ltm_search_depth"], cfg["initial_lifespan"],
                     cfg["num_final_ltms"], ltm_capacity=args.ltm_capacity or None, static_shape=True,
                     validate=False)
    memory._force_sync_free = True  # the GPU's path, eagerly too
    generator = torch.Generator().manual_seed(0)

    def step(mem: Memoria) -> None:
        data = torch.randn(B, W, H, generator=generator)
        if args.two_calls:
            mem.add_working_memory(data)
            _, idx = mem.remind()
        else:
            _, idx = mem.add_and_remind(data)
        probs = torch.rand(idx.shape, generator=generator) * (idx >= 0)
        mem.adjust_lifespan_and_memories(idx, probs / probs.sum(1, keepdim=True).clamp(min=1e-9) * 8.0)

    for _ in range(args.warmup):
        step(memory)
    C = memory.store.capacity
    k_stm_cap, _, k_f_cap = memory._caps(C)
    every = {"gpu": memory._scores_every_slot(C, k_stm_cap + k_f_cap, gpu=True), "every": True,
             "candidates": False}[args.score_slots]
    print(f"{args.config}: B {B}, W {W}, H {H}, store capacity {C} slots per row, "
          f"{'every slot scored' if every else 'candidates gathered and scored'}, "
          f"add and remind as {'two calls' if args.two_calls else 'one call'}")

    # the GPU's choices, then code generation for the compiled step
    memory._score_every_slot = every
    memoria_module._order_by_counting = lambda key: (torch.compiler.is_compiling()
                                                     and key.shape[0] * key.shape[1] ** 2
                                                     <= memoria_module._RANK_BY_COMPARE)

    def walk_as_one_kernel(self, counts, seeds, open_):
        if not self.fused_walk:
            return False
        torch.ops.census.walk(counts, seeds, open_, self.ltm_search_depth + 1)
        return True

    Memoria._walk_in_one_kernel = walk_as_one_kernel
    generate_gpu_style_code()
    log = capture_output_code()

    # Compile each call's device function once, on a copy of the steady state, with the arguments an eager step
    # gives it (the stub kernels leave garbage behind: each copy is used once).
    def compile_call(name: str, fn, *fn_args) -> None:
        before = len(log.modules)
        try:
            torch.compile(fn, fullgraph=True, dynamic=False)(*fn_args)
        except Exception:  # the code is logged before it runs
            if len(log.modules) == before:
                raise
        if len(log.modules) != before + 1:
            raise RuntimeError(f"compiling {name} logged {len(log.modules) - before} modules, expected 1")
        names.append(name)

    names: list[str] = []
    data = torch.randn(B, W, H, generator=generator)
    call = copy.deepcopy(memory)
    x, add_rows = call._prepare_add(data, None)
    if args.two_calls:
        compile_call("add", call._add_device, x, add_rows)
        call = copy.deepcopy(memory)
        call.add_working_memory(data)
        compile_call("remind", call._remind_device, call._wm_slots, call._wm_valid)
    else:
        compile_call("add_remind", call._add_and_remind_device, x, add_rows)
    call = copy.deepcopy(memory)
    _, idx = call.add_and_remind(data)
    delta = torch.rand(idx.shape, generator=generator) * (idx >= 0)
    compile_call("adjust", call._adjust_device, idx, delta, *call._last, W)

    rows = [count_row(name, code) for name, code in zip(names, log.modules)]
    return report(rows, args, argv, {"config": args.config, "batch_size": B, "capacity": C,
                                     "score_every_slot": every})


def count_row(name: str, code: str) -> dict:
    kernels, calls = census(code)
    by_kind = Counter()
    for kernel, n in kernels.items():
        by_kind[kind_of(kernel)] += n
    return {"call": name, "triton_kernels": sum(kernels.values()), "other_calls": sum(calls.values()),
            "kernels_by_kind": dict(by_kind), "calls_by_op": {op.split(".")[-1]: n for op, n in calls.items()},
            "kernels": dict(kernels)}


def report(rows: list[dict], args: argparse.Namespace, argv, header: dict) -> list[dict]:
    print("| call | Triton kernels | other calls | kernels by kind | other calls by op |")
    print("|---|---|---|---|---|")
    for row in rows:
        kinds = ", ".join(f"{k} {n}" for k, n in Counter(row["kernels_by_kind"]).most_common())
        ops = ", ".join(f"{op} {n}" for op, n in Counter(row["calls_by_op"]).most_common())
        print(f"| {row['call']} | {row['triton_kernels']} | {row['other_calls']} | {kinds} | {ops} |")
    if not args.blocks:
        print(f"| step | {sum(r['triton_kernels'] for r in rows)} | {sum(r['other_calls'] for r in rows)} | | |")
    if args.list:
        for row in rows:
            print(f"\n{row['call']}:")
            for kernel, n in sorted(row["kernels"].items()):
                print(f"  {n} x {kernel}")
            for op, n in sorted(row["calls_by_op"].items()):
                print(f"  {n} x {op}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"argv": argv if argv is not None else sys.argv[1:], **header, "rows": rows}, file, indent=1)
    return rows


def block_census(model_name: str, batch_size: int, tiny: bool = False) -> list[dict]:
    """Rows for each graph inductor compiles for the model's blocks over two training steps (a block's forward
    and backward without memory, then with it, for Memoria GPT-2), then for each module compiled with the blocks
    (`_compile_with_blocks`: Memoria GPT-2's memory reader and Abstractor), compiled alone on a fresh model."""
    from bench_step import MODELS, build, make_batches

    from experiment.models import compile_blocks, compile_module
    from experiment.tasks.language_modeling import token_nll

    model_cfg, memory_cfg, overrides = MODELS[model_name]
    seq_len, vocab_size = (16, 1000) if tiny else (150, 50257)
    if tiny:
        model_cfg, memory_cfg = f"{model_cfg}_tiny", "tiny"
    generate_gpu_style_code()
    log = capture_output_code()

    def compiled_rows(prefix: str, compile_model) -> list[dict]:
        torch._dynamo.reset()
        log.modules.clear()
        torch.manual_seed(0)
        model = build(model_cfg, memory_cfg, overrides, vocab_size, torch.device("cpu")).train()
        compile_model(model)
        [(ids, labels)] = make_batches(1, batch_size, seq_len, vocab_size, 0, torch.device("cpu"))
        for _ in range(2):  # the stub kernels compute nothing: the losses are garbage, the code is what counts
            token_nll(model(ids).logits, labels)[0].backward()
            model.zero_grad(set_to_none=True)
        names = [re.search(r"AOT ID: \['([^']+)'\]", code).group(1) for code in log.modules]
        return [count_row(f"{prefix} {name}", code) for name, code in zip(names, log.modules)]

    companions = []

    def compile_only_blocks(model):
        companions.extend(getattr(model, "_compile_with_blocks", ()))
        compile_blocks(model, companions=False)

    rows = compiled_rows("block", compile_only_blocks)
    for companion in sorted(companions):
        def compile_companion(model, companion=companion):
            for module in model.modules():
                if type(module).__name__ == companion:
                    compile_module(module)
        rows += compiled_rows(companion, compile_companion)
    return rows


def capture_output_code() -> CodeLog:
    """Start collecting inductor's output code."""
    log = CodeLog()
    torch._logging.set_logs(output_code=True)
    code_logger = logging.getLogger("torch._inductor.codecache.__output_code")
    code_logger.addHandler(log)
    code_logger.propagate = False
    return log

if __name__ == "__main__":
    main()
