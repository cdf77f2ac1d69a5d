"""The runtimes besides the default one, against the PyTorch reference, with the losslessness tests run against
each: eagle3's native kernels with fp32 and int8 weights and with int8 weights and activations (native,
native-int8, native-w8a8), OpenVINO fp32 and int8. Greedy speculative output
equals plain output of the same runtime, token for token, for every drafter and batch size; sampled output
draws from that runtime's own distribution."""

import ctypes
import dataclasses

import pytest
import torch

from eagle3.runtimes import native
from eagle3.methods.draft import new_draft
from eagle3.methods.drafter import Eagle3Drafter, NoDrafter
from eagle3.decoding.engine import Engine, Request
from eagle3.decoding.generate import generate
from eagle3.runtimes.native_weights import NATIVE_ROWS, NativeWeight
from eagle3.runtimes.model import load_model
from eagle3.methods.pld import PromptLookupDrafter
from eagle3.runtimes.native_draft import NativeDraft
from eagle3.runtimes.native_weights import to_native
from eagle3.runtimes.norm_folding import fold_norms
from eagle3.runtimes.runtime import NativeRuntime, TorchRuntime, make_runtime, pad_trees
from eagle3.decoding.sampling import SamplingParams, probs_from_logits
from eagle3.runtimes.target import load_target
from eagle3.decoding.tree import DraftTree, TreeSpec, ancestor_mask, chain
from oracles import TargetOracle
from test_model import close, tiny_config
from test_sampling_exact import ALPHA, PARAMS, TREE, batched_triples, chi_square_p_value

RUNTIMES = ["native", "native-int8", "native-w8a8", "openvino", "openvino-int8"]


def openvino_runtime():
    return pytest.importorskip("eagle3.runtimes.openvino_runtime", reason="the OpenVINO runtime needs the openvino package")
PROMPTS = ["Once upon a time", "Tom had a big red", "One day, a little girl named Lily went to the park with her mom",
           "The cat", "Sara and Ben were playing in the garden when they saw a small bird"]  # fmt: skip
BUDGETS = [60, 25, 90, 7, 40]


@pytest.fixture(scope="module", params=RUNTIMES)
def target(request, stories_path):
    """stories260K on the OpenVINO runtime, with "." as a stop token too (rows end at different times)."""
    if request.param.startswith("openvino"):
        openvino_runtime()
    elif native.library() is None:
        pytest.skip(f"eagle3's native kernels are unavailable here: {native.why_unavailable()}")
    loaded = load_target(str(stories_path), runtime=request.param)
    period = loaded.tokenizer.convert_tokens_to_ids(".")
    return dataclasses.replace(loaded, eos_token_ids=frozenset({*loaded.eos_token_ids, period}))


def a_tree(tokens: list[int], parents: list[int]) -> DraftTree:
    depths = [0] * len(parents)
    for i, p in enumerate(parents[1:], start=1):
        depths[i] = depths[p] + 1
    children = [[j for j, p in enumerate(parents) if p == i] for i in range(len(parents))]
    return DraftTree(torch.tensor(tokens), parents, torch.tensor(depths), ancestor_mask(parents), children,
                     torch.zeros(len(parents)))  # fmt: skip


@pytest.mark.openvino
def test_forward_matches_the_pytorch_model(stories):
    """Prefill and a tree verify in two rows of different lengths: OpenVINO fp32 logits and taps match the
    PyTorch runtime's, and committing a path that is no prefix keeps the two caches in step."""
    taps = (0, 2, 4, 5)  # (5: the last layer's output)
    ov, ref = openvino_runtime().OpenVINORuntime(stories.model, taps), TorchRuntime(stories, taps)
    prompts = [stories.encode(PROMPTS[2]), stories.encode(PROMPTS[0])]
    for runtime in (ov, ref):
        runtime.open(2, 128, spare=8)
    for prompt in prompts:
        (_, a, ta), (_, b, tb) = ov.prefill(prompt), ref.prefill(prompt)
        assert torch.allclose(a, b, atol=1e-4) and torch.allclose(ta, tb, atol=1e-4)
    trees = [a_tree([5, 6, 7, 8, 9], [-1, 0, 0, 1, 2]), a_tree([11, 12, 13], [-1, 0, 1])]
    for paths in ([[0, 2, 4], [0, 1]], [[0, 1], [0, 1, 2]]):
        (la, ta), (lb, tb) = ov.verify(trees), ref.verify(trees)
        assert la.shape == lb.shape == (2, 5, stories.model.config.vocab_size)
        assert torch.allclose(la, lb, atol=1e-4) and torch.allclose(ta, tb, atol=1e-4)
        ov.commit(paths)
        ref.commit(paths)
        assert [ov.length(r) for r in (0, 1)] == [ref.length(r) for r in (0, 1)]
    ov.release(0)
    ref.release(0)
    (la, _), (lb, _) = ov.verify([chain(torch.tensor([3, 4]))]), ref.verify([chain(torch.tensor([3, 4]))])
    assert torch.allclose(la, lb, atol=1e-4)


@pytest.mark.openvino
def test_the_thread_keeps_its_signal_stack(stories):
    """OpenVINO installs an alternate signal stack of its own on the thread that runs it, in memory freed with
    its objects; CPython handles signals on that stack, so a later SIGTERM crashed the process. The runtime
    gives the thread its own back."""
    ov = openvino_runtime()
    if ov._LIBC is None:
        pytest.skip("sigaltstack is read through Linux's libc")

    def current():
        stack = ov._SignalStack()
        ov._LIBC.sigaltstack(None, ctypes.byref(stack))
        return stack.ss_sp, stack.ss_size

    before = current()
    ov_target = dataclasses.replace(stories, runtime="openvino")
    generate(ov_target, stories.encode(PROMPTS[0]), 5)
    assert current() == before


@pytest.mark.openvino
def test_cache_grows_past_its_first_slots(stories):
    """A sequence longer than the first slots (the cache doubles) decodes as the PyTorch runtime does."""
    ov_target = dataclasses.replace(stories, runtime="openvino")
    prompt = stories.encode(PROMPTS[2])
    n = openvino_runtime().OpenVINORuntime.FIRST_SLOTS + 40 - len(prompt)
    assert generate(ov_target, prompt, n).token_ids == generate(stories, prompt, n).token_ids


def drafters(target):
    """On the native runtimes the EAGLE-3 draft steps natively too (as load_drafter sets it up)."""
    draft = new_draft(target.model.config, seed=2).attach(target.model.embed.weight)
    if target.runtime.startswith("native"):
        draft.native = NativeDraft(draft)
    untrained = Eagle3Drafter(draft)
    return {"eagle3": (untrained, TreeSpec(10, 3, 3)), "oracle": (TargetOracle(load_model(target.path, device="cpu")),
            TreeSpec(12, 4, 2)), "pld": (PromptLookupDrafter(4), PromptLookupDrafter(4).tree)}  # fmt: skip


@pytest.mark.parametrize("rows", [1, 3])
def test_greedy_speculation_equals_plain_on_the_same_runtime(target, rows):
    requests = [Request(target.encode(p), b) for p, b in zip(PROMPTS, BUDGETS)]
    plain = [r.token_ids for r in Engine(target, NoDrafter(), max_rows=1).run(requests)]
    assert [r.token_ids for r in Engine(target, NoDrafter(), max_rows=rows).run(requests)] == plain
    for name, (drafter, tree) in drafters(target).items():
        results = Engine(target, drafter, tree, max_rows=rows).run(requests)
        assert [r.token_ids for r in results] == plain, (name, rows)
        if name == "oracle" and target.runtime == "openvino":  # (the fp32 oracle matches the fp32 target)
            assert max(max(r.accept_lengths, default=1) for r in results) > 2


def runtime_triples(target, prompt, params):
    """{(x1, x2, x3): probability} under the target's own runtime, each prefix prefilled in a row."""
    runtime = Engine(target).runtime
    runtime.open(1, len(prompt) + 3)

    def probs(ids):
        _, logits, _ = runtime.prefill(ids)
        runtime.release(0)
        return probs_from_logits(logits, params)

    table = {}
    p1 = probs(prompt)
    for a in p1.nonzero().flatten().tolist():
        p2 = probs(prompt + [a])
        for b in p2.nonzero().flatten().tolist():
            p3 = probs(prompt + [a, b])
            for c in p3.nonzero().flatten().tolist():
                table[(a, b, c)] = float(p1[a]) * float(p2[b]) * float(p3[c])
    return table


def test_sampling_draws_from_the_runtime_distribution(target):
    prompt = target.encode("One day, Tom")
    table = runtime_triples(target, prompt, SamplingParams(**PARAMS))
    assert abs(sum(table.values()) - 1) < 1e-4
    drafter = drafters(target)["eagle3"][0]
    samples = batched_triples(Engine(target, drafter, TREE, max_rows=4), prompt)
    assert chi_square_p_value(samples, table) > ALPHA


@pytest.mark.openvino
def test_refuses_what_it_cannot_run(stories_path):
    with pytest.raises(ValueError, match="unknown runtime"):
        load_target(str(stories_path), runtime="tensorrt")
    with pytest.raises(ValueError, match="float32"):
        load_target(str(stories_path), dtype="bfloat16", runtime="native-int8")
    openvino_runtime()
    with pytest.raises(ValueError, match="float32"):
        load_target(str(stories_path), dtype="bfloat16", runtime="openvino")


# ---------------------------------------------------------------------------------------------- native kernels


@pytest.fixture
def kernels():
    if native.library() is None:
        pytest.skip(f"eagle3's native kernels are unavailable here: {native.why_unavailable()}")


def test_the_auto_runtime_is_native_fp32_on_a_cpu_in_float32_and_torch_elsewhere(kernels, stories_path, monkeypatch):
    """`--runtime auto` (the commands' default): native fp32 on the CPU in float32 where the kernels build; the
    PyTorch model for another dtype, a GPU, or where the kernels are unavailable (never an int8 precision, which
    changes the output)."""
    from eagle3.runtimes.target import choose_runtime

    assert choose_runtime("float32", "cpu") == "native"
    assert choose_runtime("bfloat16", "cpu") == choose_runtime(torch.float16, "cpu") == "torch"
    assert choose_runtime("float32", "cuda") == choose_runtime("float32", "cuda:1") == "torch"
    assert load_target(str(stories_path), runtime="auto").runtime == choose_runtime("float32")
    monkeypatch.setattr(native, "library", lambda: None)  # (no compiler)
    assert choose_runtime("float32", "cpu") == "torch"
    assert load_target(str(stories_path), runtime="auto", device="cpu").runtime == "torch"


@pytest.mark.parametrize("out,width", [(4, 96), (7, 100), (64, 172), (5, 3), (13, 48)])
def test_native_kernels_match_torch_and_do_not_depend_on_the_row_count(kernels, out, width):
    """fp32 and int8 results are close to torch's, for any shape (full panels and plain rows after them, vector
    steps and a tail), the panels unpack to the matrix, and each row's result is bitwise the same whether it
    runs alone or among 1..14 rows (register blocks of every size: what makes speculation lossless)."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(14, width, generator=gen), torch.randn(out, width, generator=gen)  # w [out, in]
    fp32, int8 = NativeWeight.of(w), NativeWeight.of(w, "int8")
    assert torch.equal(fp32.dense(), w)
    assert torch.allclose(fp32.matmul(x), x @ w.t(), atol=1e-4)
    assert torch.allclose(int8.matmul(x), x @ int8.dense().t(), atol=1e-4)
    assert (int8.dense() - w).abs().max() <= int8.scale.max() / 2 + 1e-6
    long = torch.randn(NATIVE_ROWS + 1, width, generator=gen)  # (a prompt: torch's matmul on the dense matrix)
    assert torch.allclose(fp32.matmul(long), long @ w.t(), atol=1e-4)
    assert torch.allclose(int8.matmul(long), long @ int8.dense().t(), atol=1e-4)
    for weight in (fp32, int8):
        alone = torch.cat([weight.matmul(x[r : r + 1]) for r in range(14)])
        for rows in range(1, 15):
            assert torch.equal(weight.matmul(x[:rows]), alone[:rows]), rows


def w8a8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A8 in float64, from its definition (kernels/w8a8.hpp): x quantized per block of 32 columns (scale amax /
    127, round half to even), exact integer dot products per block, scaled and summed, times the row scale."""
    blocks = -(-x.shape[1] // 32)
    pad = blocks * 32 - x.shape[1]
    xb = torch.nn.functional.pad(x, (0, pad)).view(x.shape[0], blocks, 32)
    amax = xb.abs().amax(-1)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(xb * inverse[..., None]).clamp(-127, 127).double()
    qb = torch.nn.functional.pad(q.double(), (0, pad)).view(q.shape[0], blocks, 32)
    dots = torch.einsum("rbi,obi->rob", xq, qb)
    return (dots * (amax.double() / 127)[:, None, :]).sum(-1) * scale.double()


@pytest.mark.parametrize("out,width", [(4, 96), (7, 100), (33, 64), (64, 172), (5, 3), (13, 48)])
def test_w8a8_kernel_matches_its_definition_and_does_not_depend_on_the_row_count(kernels, out, width):
    """W8A8 (int8 weights and activations, kernels/w8a8.hpp): its panels unpack to the int8 matrix, its results
    match the float64 definition for any shape (padded rows and columns, an odd last panel), prompts of any
    length run through it too, and each row's result is bitwise the same alone or among 1..14 rows."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(14, width, generator=gen), torch.randn(out, width, generator=gen)
    x[3, : min(width, 32)] = 0.0  # (a block of zeros: scale 0)
    weight, int8 = NativeWeight.of(w, "w8a8"), NativeWeight.of(w, "int8")
    assert weight.data.dtype == torch.uint8 and torch.equal(weight.dense(), int8.dense())
    q = native.unpack_w8a8(weight.data, out, width)
    reference = w8a8_reference(x, q, weight.scale)
    assert torch.allclose(weight.matmul(x).double(), reference, rtol=1e-5, atol=1e-5 * reference.abs().max())
    long = torch.randn(NATIVE_ROWS + 1, width, generator=gen)
    assert torch.allclose(weight.matmul(long).double(), w8a8_reference(long, q, weight.scale), rtol=1e-5, atol=1e-4)
    alone = torch.cat([weight.matmul(x[r : r + 1]) for r in range(14)])
    for rows in range(1, 15):
        assert torch.equal(weight.matmul(x[:rows]), alone[:rows]), rows


@pytest.mark.parametrize("flags", [("-mno-avx512vnni", "-mno-avxvnni"), ("-mno-avx512f", "-mno-avxvnni")])
def test_w8a8_kernel_gives_the_same_bits_with_its_dot_products_emulated(kernels, flags):
    """Built without VNNI (AVX-512's dot products emulated with 16-bit multiplies) or without AVX-512 (AVX2's
    8-lane vectors, emulated), the W8A8 kernel returns this build's results bit for bit: its integer sums are
    exact and every output's float accumulation is the same, so where the user's CPU lacks VNNI only the speed
    differs."""
    variant = kernels_built_with(flags)
    assert variant.eagle3_w8a8_native_dot() == 0
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(14, 100, generator=gen), torch.randn(37, 100, generator=gen)
    weight = NativeWeight.of(w, "w8a8")
    for rows in (1, 5, 14):
        y = torch.empty(rows, 37)
        variant.eagle3_linear_w8a8(x.data_ptr(), rows, 100, weight.data.data_ptr(), weight.scale.data_ptr(), 37, y.data_ptr())
        assert torch.equal(y, weight.matmul(x[:rows])), rows


def test_native_kernels_absent_say_why(monkeypatch):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_why", None)
    monkeypatch.setenv("EAGLE3_NATIVE", "0")
    assert native.library() is None and native.why_unavailable() == "EAGLE3_NATIVE=0"
    monkeypatch.setattr(native, "_why", None)
    monkeypatch.setenv("EAGLE3_NATIVE", "1")
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    assert native.library() is None and "compiler" in native.why_unavailable()
    with pytest.raises(ValueError, match="native kernels"):
        to_native(torch.nn.Module(), "int8")  # (refused before the model is looked at)


# ---------------------------------------------------------------------------------------------- native forward


def kernels_built_with(flags: tuple[str, ...]):
    """A build of the native kernels with extra compiler flags (e.g. without AVX-512)."""
    import os
    import shutil

    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    return native.load(native._build(compiler, native.FLAGS + flags))


@pytest.mark.parametrize("kind,build", [("llama3", ""), ("llama-bias-tied", ""), ("qwen3", ""), ("mistral-sliding", ""),
                                        ("llama3", "avx2"), ("qwen3", "avx2")])  # fmt: skip
def test_native_forward_matches_the_pytorch_model(kernels, tmp_path, monkeypatch, kind, build):
    """The native runtime's layers in one call (fp32) against the PyTorch model, for each family's features
    (GQA, biases, Qwen3's q/k norm and head_dim 16, a sliding window the rows outgrow), and with the kernels
    built for AVX2 (8-lane vectors, part-filled ones for head_dim 8): three rows of different lengths verify
    trees of their own, then keep paths that are no prefix, twice; logits and taps match."""
    from transformers import AutoModelForCausalLM

    if build == "avx2":
        monkeypatch.setattr(native, "_library", kernels_built_with(("-mno-avx512f",)))
        assert native.vector_width() == 8
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(kind)).save_pretrained(tmp_path)
    taps = (0, 3, 6, 8)  # (8: the last layer's output)
    ref = TorchRuntime(dataclasses.make_dataclass("T", ["model"])(fold_norms(load_model(tmp_path, device="cpu"))), taps)
    nat = NativeRuntime(dataclasses.make_dataclass("T", ["model"])(to_native(fold_norms(load_model(tmp_path, device="cpu")))), taps)
    for runtime in (ref, nat):
        runtime.open(3, 64, spare=8)
    for prompt in (list(range(3, 23)), list(range(10, 15)), list(range(40, 70))):
        (_, a, ta), (_, b, tb) = nat.prefill(prompt), ref.prefill(prompt)
        assert close(a, b) and close(ta, tb)
    trees = [a_tree([5, 6, 7, 8, 9], [-1, 0, 0, 1, 2]), a_tree([11, 12, 13], [-1, 0, 1]), a_tree([1, 2], [-1, 0])]
    for paths in ([[0, 2, 4], [0, 1], [0]], [[0, 1], [0, 1, 2], [0, 1]]):
        (la, ta), (lb, tb) = nat.verify(trees), ref.verify(trees)
        assert la.shape == lb.shape == (3, 5, 97)
        assert close(la, lb) and close(ta, tb)
        nat.commit(paths)
        ref.commit(paths)
    nat.release(0)
    ref.release(0)
    (la, _), (lb, _) = nat.verify([chain(torch.tensor([3, 4]))] * 2), ref.verify([chain(torch.tensor([3, 4]))] * 2)
    assert close(la, lb)


@pytest.mark.parametrize("runtime", ["native", "native-int8", "native-w8a8"])
def test_native_tree_logits_are_bitwise_its_path_decoded_token_by_token(kernels, stories_path, runtime):
    """What makes the native runtimes lossless by construction: a tree verified beside another row gives, at
    each node of a path, bitwise the logits of that path decoded one token at a time alone."""
    target = load_target(str(stories_path), runtime=runtime)
    runtime = make_runtime(target)
    runtime.open(2, 128, spare=8)
    prompt = target.encode(PROMPTS[2])
    runtime.prefill(prompt)
    runtime.prefill(target.encode(PROMPTS[0]))
    tree_logits, _ = runtime.verify([a_tree([5, 6, 7, 8, 9], [-1, 0, 0, 1, 2]), a_tree([11, 12, 13], [-1, 0, 1])])
    runtime.open(1, 128)
    runtime.prefill(prompt)
    for node, token in ((0, 5), (2, 7), (4, 9)):
        logits, _ = runtime.verify([chain(torch.tensor([token]))])
        assert torch.equal(logits[0, 0], tree_logits[0, node])
        runtime.commit([[0]])


def test_openvino_int8_tree_logits_are_its_paths_decoded_token_by_token(tmp_path):
    """OpenVINO int8 at SmolLM2's widths: a tree's logits at each node of a path are that path's decoded one
    token at a time (to float rounding). With OpenVINO's default dynamic quantization of the activations
    (on CPUs with VNNI) they were not (about 1e-2 apart), and EAGLE-3's output differed from plain decoding's."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    ovr = openvino_runtime()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=128,
                         tie_word_embeddings=False)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    runtime = ovr.OpenVINORuntime(fold_norms(load_model(tmp_path, device="cpu")), (), "int8")
    prompt = list(range(3, 23))
    runtime.open(1, 64, spare=8)
    runtime.prefill(prompt)
    tree_logits, _ = runtime.verify([a_tree([5, 6, 7, 8, 9], [-1, 0, 0, 1, 2])])
    runtime.open(1, 64, spare=8)
    runtime.prefill(prompt)
    for node, token in ((0, 5), (2, 7), (4, 9)):
        logits, _ = runtime.verify([chain(torch.tensor([token]))])
        assert (logits[0, 0] - tree_logits[0, node]).abs().max() < 1e-4
        runtime.commit([[0]])


@pytest.mark.parametrize("precision", ["fp32", "int8", "w8a8"])
def test_native_draft_step_matches_the_pytorch_draft(kernels, stories, precision):
    """The draft's step on the native kernels against its PyTorch step: a catch-up of two rows, then two tree
    levels whose masks reach back into the earlier level (rows at different slots); outputs and logits match
    (in int8 and w8a8 within their rounding)."""
    torch.manual_seed(0)
    draft = new_draft(stories.model.config, seed=1).attach(stories.model.embed.weight)
    for p in draft.parameters():
        if p.dim() == 1:  # (norm weights away from 1, so that folding them is tested)
            p.data.normal_(1.0, 0.1)
    H = stories.model.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, 500, shape, generator=gen) for shape in ((2, 7), (2, 3), (2, 2))]
    features = [torch.randn(2, 7, 3 * H, generator=gen), torch.randn(2, 3, H, generator=gen), torch.randn(2, 2, H, generator=gen)]
    level1 = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool).repeat(2, 1, 1)
    level2 = torch.zeros(2, 2, 5, dtype=torch.bool)
    level2[:, :, 0] = level2[:, 0, 3] = level2[:, 1, 4] = level2[:, 1, 1] = True

    def steps(native_draft):
        draft.native = native_draft
        draft.setup_cache(64, 2)
        h = [draft(tokens[0], features[0], torch.arange(7)[None].expand(2, 7))]
        draft.cache.lengths = [5, 7]  # (rows at different slots, as after a ragged catch-up)
        h.append(draft(tokens[1], features[1], torch.tensor([[5, 6, 6], [7, 8, 8]]), level1, [5, 7]))
        h.append(draft(tokens[2], features[2], torch.tensor([[7, 7], [9, 9]]), level2, [5, 7]))
        return h, draft.logits(h[-1])

    (ref, ref_logits), (got, got_logits) = steps(None), steps(NativeDraft(draft, precision))
    atol = {"fp32": 1e-5, "int8": 2e-2, "w8a8": 5e-2}[precision]
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, atol=atol)
    assert torch.allclose(got_logits, ref_logits, atol=atol)
    with pytest.raises(ValueError, match="mask"):
        draft.native = NativeDraft(draft)
        draft(tokens[1], features[1], torch.tensor([[5, 6, 6], [7, 8, 8]]), level2, [5, 7])


def test_pad_trees_pads_every_tree_to_the_largest_and_leaves_one_tree_as_it_is():
    small, large = chain(torch.tensor([3, 4])), chain(torch.tensor([5, 6, 7]))
    tokens, depths, masks = pad_trees([small, large])
    assert tokens.tolist() == [[3, 4, 0], [5, 6, 7]] and depths.tolist() == [[0, 1, 0], [0, 1, 2]]
    assert masks[0].tolist() == [[True, False, False], [True, True, False], [False, False, True]]  # padding: itself
    tokens, depths, masks = pad_trees([large])  # (a plain step's path: no copies)
    assert tokens.data_ptr() == large.tokens.data_ptr() and masks.data_ptr() == large.mask.data_ptr()
    assert tokens.shape == (1, 3) and depths.tolist() == [[0, 1, 2]] and torch.equal(masks[0], large.mask)
