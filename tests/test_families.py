"""Every native family, and the transformers fallback runner (OLMo 2, which has no native one,
and Gemma 2 forced onto it), against transformers itself.

Each family's tiny randomly initialised model (its own config class, 2 layers, hidden 64, weights
scaled up so that logits are not near-ties, norm weights and biases perturbed so that their
formulas matter) is saved to a folder and loaded through the project's loader. Checks: logits
equal to transformers' forward, greedy output equal to transformers `generate` for 32 tokens, a
tree forward equal to sequential decoding, rows independent of the batch (both attention modes),
and speculative greedy (pld, logitspec) equal to `ar`."""

import pytest
import torch

from decoding.families import NATIVE, build_model
from decoding.loader import load
from decoding.model import Rope, SeqBatchEntry
from decoding.tree import DraftTree, NodeKind
from decoding.verify import SamplingParams
from conftest import engines_for

DRAFT = NodeKind("draft", (), 1)  # a test node's kind (statistics need one)

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.1,
              tie_word_embeddings=False, bos_token_id=2, eos_token_id=None, pad_token_id=0)
WINDOW = 6  # sliding windows shorter than the prompt, so that they matter
ALTERNATING = ["sliding_attention", "full_attention"]
GEMMA3 = dict(sliding_window=WINDOW, layer_types=ALTERNATING, query_pre_attn_scalar=24, final_logit_softcapping=8.0,
              rope_local_base_freq=100.0, tie_word_embeddings=True)
PHI3 = dict(partial_rotary_factor=0.5, sliding_window=WINDOW, max_position_embeddings=128,
            original_max_position_embeddings=64,
            rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.5, 2.0, 4.0],
                                 long_factor=[2.0, 6.0, 12.0, 40.0], original_max_position_embeddings=64))

# name -> (config class, its options, --runner); auto picks native where there is a native runner
FAMILIES = {
    "llama3": ("LlamaConfig", dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                                        original_max_position_embeddings=32)), "auto"),
    "qwen2": ("Qwen2Config", {}, "auto"),
    "qwen3": ("Qwen3Config", {}, "auto"),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW), "auto"),
    "gemma2": ("Gemma2Config", dict(sliding_window=WINDOW, layer_types=ALTERNATING, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=3.0, final_logit_softcapping=8.0,
                                    tie_word_embeddings=True), "auto"),
    "gemma3": ("Gemma3TextConfig", GEMMA3, "auto"),
    # an image-text Gemma 3 (4B and up), run as its text model
    "gemma3-multimodal": ("Gemma3Config", dict(
        text_config={**COMMON, **GEMMA3}, initializer_range=0.1, mm_tokens_per_image=4, boi_token_index=VOCAB - 3,
        eoi_token_index=VOCAB - 2, image_token_index=VOCAB - 1,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14)), "auto"),
    # LongRoPE within the original context (test_longrope_past_the_original_context: beyond it)
    "phi3": ("Phi3Config", PHI3, "auto"),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                         norm_topk_prob=True, mlp_only_layers=[1]), "auto"),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW), "auto"),
    # no native runner: auto picks transformers' own model class over our KV cache
    "olmo2": ("Olmo2Config", {}, "auto"),
    # the fallback on a family with sliding windows and soft-capping, which it passes to LayerAttention
    "gemma2-transformers": ("Gemma2Config", dict(sliding_window=WINDOW, layer_types=ALTERNATING,
                                                 query_pre_attn_scalar=24, attn_logit_softcapping=3.0,
                                                 final_logit_softcapping=8.0), "transformers"),
}
PROMPT = [2, 10, 11, 12, 13, 14, 10, 11, 12, 13, 14, 10, 11, 12]  # repetitive, so drafts get accepted
NEW_TOKENS = 32


def save_tokenizer(folder):
    """A word-level tokenizer over the vocabulary: "t5 t6" is ids 5, 6 (no chat template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(folder)


def make_model(config_class, options, folder):
    """A tiny random transformers model of one family, saved with a tokenizer to folder."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**(options if "text_config" in options else {**COMMON, **options}))
    hf_model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            if p.dim() == 1:  # norms start at 1 (Gemma: 0) and biases at 0: make them matter
                p.add_(torch.randn_like(p) * 0.2)
    hf_model.generation_config.eos_token_id = None
    hf_model.save_pretrained(folder)
    save_tokenizer(folder)
    return hf_model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, transformers model, our loaded model, --runner) for one family."""
    name = request.param
    config_class, options, runner = FAMILIES[name]
    folder = tmp_path_factory.mktemp(name)
    hf_model = make_model(config_class, options, folder)
    return name, hf_model, load(str(folder)), runner


@pytest.fixture(scope="module")
def engines(family):
    _, _, loaded, runner = family
    engines = engines_for(loaded, runner=runner, max_context=128, adaptive=False)
    for engine in engines.values():
        engine.stop_ids = frozenset()  # no eos: every run emits exactly its tokens
    return engines


def prefill(model, cache, slot, tokens):
    n = len(tokens)
    return model.forward(torch.tensor(tokens), torch.arange(n), [SeqBatchEntry(slot, 0, n, None)], cache)


def test_runner_is_the_familys(family, engines):
    _, _, loaded, runner = family
    native = runner == "auto" and loaded.hf_config["model_type"] in NATIVE
    assert engines["ar"].model.runner == ("native" if native else "transformers")


def test_logits_equal_transformers_forward(family, engines):
    _, hf_model, _, _ = family
    model = engines["ar"].model
    ours = prefill(model, model.new_cache(1, 64), 0, PROMPT)
    with torch.no_grad():
        ref = hf_model(torch.tensor([PROMPT])).logits[0]
    assert ref.abs().max() > 1.0  # not near-flat: greedy comparisons mean something
    assert (ours - ref).abs().max() <= 1e-4


def test_greedy_equals_transformers_generate(family, engines):
    _, hf_model, _, _ = family
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long))[0, len(PROMPT):]
    out = engines["ar"].generate(PROMPT, SamplingParams(), NEW_TOKENS).output
    assert out == ref.tolist()


def test_tree_forward_equals_sequential_decoding(engines):
    model = engines["ar"].model
    past = len(PROMPT)
    seq_cache, tree_cache = model.new_cache(1, 64), model.new_cache(1, 64)
    prefill(model, seq_cache, 0, PROMPT)
    prefill(model, tree_cache, 0, PROMPT)
    ref = torch.cat([model.forward(torch.tensor([tok]), torch.tensor([past + i]),
                                   [SeqBatchEntry(0, past + i, 1, None)], seq_cache) for i, tok in enumerate([7, 8, 9])])
    t = DraftTree.root(7)  # 7 -> (30, 8 -> (31, 9))
    t.add(0, 30, DRAFT)
    n8 = t.add(0, 8, DRAFT)
    t.add(n8, 31, DRAFT)
    n9 = t.add(n8, 9, DRAFT)
    out = model.forward(torch.tensor(t.tokens), torch.tensor([past + d for d in t.depths]),
                        [SeqBatchEntry(0, past, len(t), t.attention_mask())], tree_cache)
    path = t.path_to(n9)
    assert torch.allclose(out[path], ref, atol=2e-5)
    tree_cache.keep(0, past, path)  # decoding goes on from the accepted path as if it had been sequential
    step = (torch.tensor([50]), torch.tensor([past + 3]), [SeqBatchEntry(0, past + 3, 1, None)])
    assert torch.allclose(model.forward(*step, tree_cache), model.forward(*step, seq_cache), atol=2e-5)


@pytest.mark.parametrize("mode", ["batched", "per-sequence"])
def test_rows_do_not_depend_on_the_batch(engines, mode):
    """A tree in one slot and single rows in two others, in one forward, equal to each alone."""
    model = engines["ar"].model
    prompts = {0: PROMPT[:5], 2: PROMPT, 3: PROMPT[3:10]}
    t = DraftTree.root(7)
    t.add(0, 30, DRAFT)
    n8 = t.add(0, 8, DRAFT)
    t.add(n8, 31, DRAFT)
    rows = {2: (t.tokens, t.attention_mask()), 0: ([44], None), 3: ([45], None)}
    alone = {}
    for slot, (tokens, mask) in rows.items():
        cache = model.new_cache(4, 64)
        prefill(model, cache, slot, prompts[slot])
        past = len(prompts[slot])
        depths = t.depths if mask is not None else [0]
        alone[slot] = model.forward(torch.tensor(tokens), torch.tensor([past + d for d in depths]),
                                    [SeqBatchEntry(slot, past, len(tokens), mask)], cache)
    cache = model.new_cache(4, 64)
    for slot, p in prompts.items():
        prefill(model, cache, slot, p)
    model.attention_mode = mode
    try:
        out = model.forward(torch.tensor([tok for tokens, _ in rows.values() for tok in tokens]),
                            torch.tensor([len(prompts[2]) + d for d in t.depths] + [5, 7]),
                            [SeqBatchEntry(s, len(prompts[s]), len(tokens), mask) for s, (tokens, mask) in rows.items()],
                            cache)
    finally:
        model.attention_mode = "auto"
    assert torch.allclose(out, torch.cat(list(alone.values())), atol=2e-5)


def test_speculative_greedy_equals_ar(engines):
    ar = engines["ar"].generate(PROMPT, SamplingParams(), NEW_TOKENS)
    assert len(ar.output) == NEW_TOKENS
    steps = {}
    for method in ("pld", "logitspec"):
        seq = engines[method].generate(PROMPT, SamplingParams(), NEW_TOKENS)
        assert seq.output == ar.output, method
        steps[method] = seq.steps
    assert steps["logitspec"] < ar.steps  # drafts were accepted: the equality covers multi-token steps


def test_longrope_past_the_original_context(tmp_path):
    """Phi-3's LongRoPE past original_max_position_embeddings (24 here): each row rotates with the
    long factors from position 24 on, keys already cached keep the short ones. That equals
    transformers' own forward token by token over its cache. (transformers' `generate` for Phi-3
    instead recomputes the whole cache with the long factors when the sequence first passes 24, so
    past that point our output differs from its `generate`; see decoding.model.Rope.)"""
    from transformers import DynamicCache

    options = dict(PHI3, original_max_position_embeddings=24,
                   rope_parameters=dict(PHI3["rope_parameters"], original_max_position_embeddings=24))
    hf_model = make_model("Phi3Config", options, tmp_path)
    loaded = load(str(tmp_path))
    model = NATIVE["phi3"](loaded.hf_config, loaded.state, torch.device("cpu"), torch.float32)
    tokens = (PROMPT * 3)[:36]
    cache = model.new_cache(1, 64)
    ours = [prefill(model, cache, 0, tokens[:20])]
    ours += [model.forward(torch.tensor([tok]), torch.tensor([p]), [SeqBatchEntry(0, p, 1, None)], cache)
             for p, tok in enumerate(tokens[20:], start=20)]
    with torch.no_grad():
        hf_cache = DynamicCache(config=hf_model.config)
        ref = [hf_model(torch.tensor([tokens[:20]]), cache=hf_cache).logits[0]]
        ref += [hf_model(torch.tensor([[tok]]), position_ids=torch.tensor([[p]]), cache=hf_cache).logits[0]
                for p, tok in enumerate(tokens[20:], start=20)]
    assert (torch.cat(ours) - torch.cat(ref)).abs().max() <= 1e-4
    short = Rope(model.hf, torch.device("cpu"), torch.float32)
    short.long_from = None  # the short factors everywhere: past 24 the logits must differ
    model.ropes = {"all": short}
    cache = model.new_cache(1, 64)
    prefill(model, cache, 0, tokens[:20])
    wrong = [model.forward(torch.tensor([tok]), torch.tensor([p]), [SeqBatchEntry(0, p, 1, None)], cache)
             for p, tok in enumerate(tokens[20:], start=20)]
    assert (torch.cat(wrong)[5:] - torch.cat(ref[1:])[5:]).abs().max() > 1e-2


@pytest.mark.parametrize("turns,folded", [
    ([{"role": "user", "content": "hi"}], [{"role": "user", "content": "hi"}]),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"}],
     [{"role": "user", "content": "Be brief.\n\nhi"}, {"role": "assistant", "content": "yo"},
      {"role": "user", "content": "and?"}]),
    ([{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, {"role": "user", "content": "q"}],
     [{"role": "user", "content": "A\n\nB\n\nq"}]),
    ([{"role": "system", "content": "Only this."}], [{"role": "user", "content": "Only this."}]),
])
def test_fold_system_messages(turns, folded):
    from decoding.engine import fold_system_messages

    assert fold_system_messages(turns) == folded


def test_chat_template_without_a_system_role(tmp_path):
    """A template that refuses the system role (as Mistral v0.1's does) gets the system message
    folded into the first user message; one with a system role gets it as it is."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from decoding.engine import Engine

    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    roles = "{{ {'system': 't3', 'user': 't4', 'assistant': 't8'}[m['role']] }} {{ m['content'] }} "
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}" + roles + "{% endfor %}")
    turns = [{"role": "system", "content": "t5"}, {"role": "user", "content": "t6 t7"}]
    assert tok.decode(Engine.chat_prompt(SimpleNamespace(tokenizer=tok), turns)) == "t4 t5 t6 t7"
    tok.chat_template = "{% for m in messages %}" + roles + "{% endfor %}"
    assert tok.decode(Engine.chat_prompt(SimpleNamespace(tokenizer=tok), turns)) == "t3 t5 t4 t6 t7"


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"], indirect=True)
def test_moe_reads_transformers_in_memory_layout(family):
    """transformers 5 keeps a mixture-of-experts layer's experts as two 3D tensors (and a GGUF
    conversion saves its state dict so); checkpoints have one tensor per expert. Both load."""
    name, hf_model, loaded, _ = family
    state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    model = NATIVE[name](loaded.hf_config, state, torch.device("cpu"), torch.float32)
    ours = prefill(model, model.new_cache(1, 64), 0, PROMPT)
    with torch.no_grad():
        ref = hf_model(torch.tensor([PROMPT])).logits[0]
    assert (ours - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["qwen3", "olmo2"], indirect=True)
def test_generate_prints_runner_and_architecture(family, capsys):
    from server.cli import main

    name, _, loaded, _ = family
    assert main(["generate", "--raw", "--prompt", "t5 t6 t7", "--model", str(loaded.folder), "--method", "ar",
                 "--max-tokens", "4"]) == 0
    runner = "native" if name in NATIVE else "transformers"
    assert f"[logitspec] runner {runner}, architecture {name}, numerics float32\n" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["olmo2"], indirect=True)
def test_runner_choice_errors(family):
    from decoding.config import EngineConfig

    _, _, loaded, _ = family
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="unsupported model architecture 'olmo2' for the native runner"):
        build_model(loaded.hf_config, loaded.state, cpu, torch.float32, "native")
    with pytest.raises(ValueError, match="runner must be one of auto, native, transformers"):
        EngineConfig(runner="vllm")
    state = {k: v for k, v in loaded.state.items() if not k.endswith("layers.1.mlp.down_proj.weight")}
    with pytest.raises(ValueError, match=r"checkpoint does not match .*model.layers.1.mlp.down_proj.weight"):
        build_model(loaded.hf_config, state, cpu, torch.float32, "transformers")


def write_gguf(hf_model, path, arch):
    """A float32 GGUF of a tiny transformers model, with a byte-pair tokenizer over letters, as
    llama.cpp's converter would write it (gguf-py's tensor names)."""
    import gguf

    c = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    letters = [chr(ord("a") + i) for i in range(26)]
    pairs = [a + b for a in "abcd" for b in letters][:VOCAB - 29]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(["<pad>", "<eos>", "<bos>"] + letters + pairs)
    w.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))  # control, then normal
    w.add_token_merges([f"{p[0]} {p[1]}" for p in pairs])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    if arch == "qwen3moe":
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    for name, tensor in hf_model.state_dict().items():
        tensor = tensor.detach().float()
        if name.endswith("experts.gate_up_proj"):  # [experts, 2 inter, hidden]: llama.cpp stores gate and up apart
            layer = name.split(".")[2]
            gate, up = tensor.chunk(2, dim=1)
            w.add_tensor(f"blk.{layer}.ffn_gate_exps.weight", gate.contiguous().numpy())
            w.add_tensor(f"blk.{layer}.ffn_up_exps.weight", up.contiguous().numpy())
        elif name.endswith("experts.down_proj"):
            w.add_tensor(f"blk.{name.split('.')[2]}.ffn_down_exps.weight", tensor.numpy())
        else:
            w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["qwen3", "qwen3moe"])
def test_gguf_of_a_family_loads_natively(tmp_path, monkeypatch, arch):
    """A GGUF of a family goes through transformers' GGUF loader once (dequantized into the cache),
    then runs on its native runner with transformers' logits. transformers' GGUF config reader
    leaves Qwen3's head_dim and Qwen3-MoE's expert size at their defaults and sets norm_topk_prob,
    as in the released models: so does this one. The MoE's experts arrive in transformers'
    in-memory layout."""
    import transformers

    monkeypatch.setenv("LOGITSPEC_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    config = (transformers.Qwen3Config(**dict(COMMON, head_dim=128)) if arch == "qwen3" else
              transformers.Qwen3MoeConfig(**dict(COMMON, head_dim=128, num_experts=4, num_experts_per_tok=2,
                                                 norm_topk_prob=True)))
    hf_model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    write_gguf(hf_model, tmp_path / f"tiny-{arch}.gguf", arch)
    loaded = load(str(tmp_path / f"tiny-{arch}.gguf"))
    model = build_model(loaded.hf_config, loaded.state, torch.device("cpu"), torch.float32)
    assert (model.runner, model.architecture) == ("native", config.model_type)
    ours = prefill(model, model.new_cache(1, 64), 0, PROMPT)
    with torch.no_grad():
        ref = hf_model(torch.tensor([PROMPT])).logits[0]
    assert (ours - ref).abs().max() <= 1e-4
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("abc", add_special_tokens=False)) == "abc"
