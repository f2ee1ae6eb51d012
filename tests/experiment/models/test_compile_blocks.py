"""compile=true: every model's repeated blocks compile in place and compute what the eager model computes, with
the memory carried between segments as before (backend "eager" here: the tracing, not the code generation)."""

from __future__ import annotations

import copy

import pytest
import torch

from experiment.models import build_model, compile_blocks
from tests.conftest import compose_config

MODELS = ["memoria_gpt2_tiny", "gpt2_tiny", "transformer_xl_tiny", "compressive_tiny", "infinity_former_tiny"]


def losses(model, segments) -> list[torch.Tensor]:
    out = []
    for x in segments:
        loss = model(x, labels=x).loss
        loss.backward()
        out.append(loss.detach())
    return out


@pytest.mark.parametrize("name", MODELS)
def test_compiled_blocks_compute_what_the_eager_model_computes(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_model(compose_config([f"model={name}", "memory=tiny"]).model, vocab_size=40).eval()
    compiled = copy.deepcopy(eager)
    count = compile_blocks(compiled, backend="eager")
    assert count == compiled.config.n_layer
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints are interchangeable
    g = torch.Generator().manual_seed(1)
    segments = [torch.randint(0, 40, (2, 12), generator=g) for _ in range(4)]  # carried memory across them
    for a, b in zip(losses(eager, segments), losses(compiled, segments)):
        torch.testing.assert_close(a, b)
    for (name_a, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name_a)
    torch._dynamo.reset()


def test_compile_refuses_a_model_without_blocks():
    with pytest.raises(ValueError, match="declares no transformer blocks"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_compile_settings_merge_the_modes_options_with_the_given_ones():
    from experiment.models import compile_settings, graphs_replayed

    assert compile_settings() == {} and not graphs_replayed({})
    assert compile_settings("reduce-overhead") == {"mode": "reduce-overhead"}
    assert graphs_replayed({"mode": "reduce-overhead"}) and not graphs_replayed({"mode": "default"})
    merged = compile_settings("max-autotune", {"coordinate_descent_tuning": False})
    assert merged["options"]["max_autotune"] and not merged["options"]["coordinate_descent_tuning"]  # given ones win
    assert graphs_replayed(merged)
    assert not graphs_replayed(compile_settings(None, {"max_autotune": True}))


def test_compile_blocks_compiles_the_models_companions_unless_told_not_to():
    model = build_model(compose_config(["model=memoria_gpt2_tiny", "memory=tiny"]).model, vocab_size=40)
    reader, abstractor = model.transformer.memory_reader, model.transformer.abstractor
    compile_blocks(copy.deepcopy(model), companions=False, backend="eager")
    assert reader._compiled_call_impl is None and abstractor._compiled_call_impl is None
    compile_blocks(model, backend="eager")
    # MemoryReader and the Abstractor, named by _compile_with_blocks
    assert reader._compiled_call_impl is not None and abstractor._compiled_call_impl is not None
    assert all(block._compiled_call_impl is not None for block in model.transformer.h)
    torch._dynamo.reset()


def test_companions_compile_with_their_inductor_options_under_the_modes(monkeypatch):
    """MemoryReader's inductor options (every cat as one kernel) join the mode's options; the blocks, which have
    none, get the given settings as they are; another backend gets no inductor options."""
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((type(self).__name__, kw)))
    model = build_model(compose_config(["model=memoria_gpt2_tiny", "memory=tiny"]).model, vocab_size=40)
    compile_blocks(model, mode="reduce-overhead")
    by_class = {name: kw for name, kw in calls}
    assert by_class["GPT2WithMemoriaBlock"] == {"mode": "reduce-overhead"}
    assert by_class["MemoryReader"] == {"options": {"triton.cudagraphs": True, "force_pointwise_cat": True}}
    assert by_class["Abstractor"] == {"mode": "reduce-overhead"}
    calls.clear()
    compile_blocks(model, backend="eager")
    assert {name: kw for name, kw in calls}["MemoryReader"] == {"backend": "eager"}
    calls.clear()  # a block class's own options join the same way
    monkeypatch.setattr(type(model.transformer.h[0]), "inductor_options", {"max_autotune_gemm": True}, raising=False)
    compile_blocks(model, mode="reduce-overhead")
    assert {name: kw for name, kw in calls}["GPT2WithMemoriaBlock"] == {
        "options": {"triton.cudagraphs": True, "max_autotune_gemm": True}}


class Recorder:
    """A torch.compile backend that runs the traced graph as it is and records, per call, the storages of its
    inputs and outputs (what CUDA graph trees look at to decide what to copy into a graph's inputs)."""

    def __init__(self):
        self.calls: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def __call__(self, gm, example_inputs):
        def run(*args):
            out = gm(*args)
            outputs = out if isinstance(out, (list, tuple)) else [out]
            self.calls.append(([a for a in args if isinstance(a, torch.Tensor)],
                               [o for o in outputs if isinstance(o, torch.Tensor)]))
            return out
        return run


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("companions", [True, False])
def test_compiled_blocks_read_the_memories_from_the_compiled_readers_outputs(companions):
    """With the memory reader compiled, every memory input of every block (keys, values, masks, scales) is an
    output of the reader's graph: under CUDA graphs (mode=reduce-overhead) the blocks then take them without
    copying them into their graph inputs. Each block's only other inputs are its parameters and the hidden
    states. The eager reader (companions=False) leaves eight inputs a block that are no graph's output. With the
    Abstractor compiled too, the reader's working memory is the Abstractor graph's output."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(compose_config(["model=memoria_gpt2_tiny", "memory=tiny"]).model, vocab_size=40).eval()
    blocks, reader, abstractor = Recorder(), Recorder(), Recorder()
    compile_blocks(model, companions=False, backend=blocks)
    if companions:
        model.transformer.memory_reader.compile(backend=reader)
        model.transformer.abstractor.compile(backend=abstractor)
    parameters = {storage(p) for p in model.parameters()}
    g = torch.Generator().manual_seed(1)
    n_layer = model.config.n_layer
    for step in range(3):
        blocks.calls.clear(), reader.calls.clear(), abstractor.calls.clear()
        x = torch.randint(0, 40, (2, 12), generator=g)
        model(x, labels=x).loss.backward()
        if step == 0:
            continue  # the first segment has no memory to read
        assert len(blocks.calls) == n_layer and len(reader.calls) == len(abstractor.calls) == (1 if companions else 0)
        from_graphs = {storage(t) for _, outputs in abstractor.calls + reader.calls + blocks.calls for t in outputs}
        if companions:  # the reader's inputs from outside any graph: the rows, the reminded engrams, their
            # validity, the query weights; not the working memory
            [(reader_inputs, _)] = reader.calls
            assert len([t for t in reader_inputs if storage(t) not in parameters | from_graphs]) == 4
        for i, (inputs, _) in enumerate(blocks.calls):
            made_outside = [t for t in inputs if storage(t) not in parameters | from_graphs]
            hidden = [t for t in made_outside if t.shape == (2, 12, model.config.n_embd)]
            assert len(hidden) == (1 if i == 0 else 0)  # block 0's hidden states: the embeddings
            assert len(made_outside) - len(hidden) == (0 if companions else 8), i
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphed_blocks_copy_no_memory_input_with_the_reader_compiled():
    """mode=reduce-overhead on a GPU: with the memory reader compiled too, CUDA graph trees record at least
    8 x n_layer - 5 fewer inputs to copy (the blocks' memory inputs, less the reader's own five); with the Abstractor
    compiled as well (the default companions) its graph copies its own input, the previous segment's hidden states,
    which no graph of this step made, so the saving is smaller but stays (H100, n_layer 2: 18 copied inputs with no
    companions, 11 with both). Training starts with the same losses in all three."""
    from torch._dynamo.utils import counters

    results = {}
    for companions in ("none", "reader", "all"):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = build_model(compose_config(["model=memoria_gpt2_tiny", "memory=tiny"]).model, vocab_size=40)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0  # before compiling: the traced graphs keep it
        if companions == "reader":
            model._compile_with_blocks = ("MemoryReader",)  # this instance only
        model = model.cuda().train()
        compile_blocks(model, companions=companions != "none", mode="reduce-overhead")
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(6):
            x = torch.randint(0, 40, (2, 12), generator=g).cuda()
            torch.compiler.cudagraph_mark_step_begin()
            loss = model(x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().clone())
        results[companions] = (counters["inductor"]["cudagraph_recorded_non_static_inputs"],
                               torch.stack(losses).cpu())
    torch._dynamo.reset()
    if results["none"][0] == 0:
        pytest.skip("this torch does not count CUDA graph trees' copied inputs")
    copied = {name: count for name, (count, _) in results.items()}
    assert copied["none"] - copied["reader"] >= 8 * model.config.n_layer - 5, copied
    assert copied["all"] < copied["none"], copied
    # the first steps alike (later ones may recall other engrams once rounding has moved the parameters apart)
    for name in ("reader", "all"):
        assert torch.isfinite(results[name][1]).all(), name
        torch.testing.assert_close(results["none"][1][:3], results[name][1][:3], rtol=1e-4, atol=1e-5, msg=name)


def test_memory_reader_compiled_with_its_options_computes_what_it_computes_eagerly():
    """The reader compiled by inductor with its own options (every cat as one kernel) on the CPU: the same
    sources, keys and values, and the same gradients for the working memory and the blocks' projections."""
    from experiment.models.gpt2_memoria import MemoryReader, memory_projection_parameters

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(compose_config(["model=memoria_gpt2_tiny", "memory=tiny"]).model, vocab_size=40)
    blocks, H = model.transformer.h, model.config.n_embd
    B, W, M, T = 2, 3, 5, 7
    wm = torch.randn(B, W, H, requires_grad=True)
    remembered = torch.randn(B, M, H)
    valid = torch.rand(B, M) > 0.3
    weights = torch.rand(B, T).softmax(-1)
    rows = torch.tensor([True, False])
    results = []
    for compiled in (False, True):
        reader = MemoryReader(model.config.n_head)
        if compiled:
            reader.compile(options=reader.inductor_options)
        working, reminded, kv = reader(wm, rows, remembered, valid, weights, *memory_projection_parameters(blocks))
        loss = sum((k * k.new_tensor(range(k.numel())).view_as(k).sin()).sum() + (v ** 2).sum()
                   for block_kv in kv for k, v in block_kv)
        loss.backward()
        params = [p for block in blocks for p in (block.memory_attn.c_attn.weight, block.memory_attn.c_attn.bias)]
        results.append([*working[1:3], *reminded[1:], *(t for block_kv in kv for pair in block_kv for t in pair),
                        wm.grad.clone(), *(p.grad.clone() for p in params)])
        wm.grad = None
        model.zero_grad(set_to_none=True)
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b)
    torch._dynamo.reset()
