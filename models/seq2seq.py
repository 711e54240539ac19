"""Tiny random-weight encoder-decoder checkpoints (T5, BART, Whisper), built offline, for ``export``'s
seq2seq tasks (tests/test_pipeline_export_seq2seq.py).

    from models.seq2seq import checkpoint
    folder = checkpoint("t5", tmp / "t5")        # config.json, model.safetensors, tokenizer files
    folder = checkpoint("bart", tmp / "bart")    # the same, BART (post-LN, LayerNorms with bias)
    folder = checkpoint("whisper", tmp / "wh")   # config.json, model.safetensors, preprocessor_config.json

Weights are seeded; after init every norm scale is set to uniform [0.5, 1.5] and every
LayerNorm bias to normal * 0.1 (as in :mod:`models.fixtures`), so the scales are not all ones
(which the fold would report as already weightless) and a wrong fold changes the outputs.

T5: 2 + 2 layers, d_model 32, 4 heads, vocab 128, tied embeddings (so the decoder output is
scaled by d_model**-0.5 before the tied output layer), with a word-level tokenizer over made-up
tokens. BART: 2 + 2 layers, d_model 32, 4 heads, vocab 128, tied embeddings, the same tokenizer;
post-LN (each norm follows its residual Add, so its output is also the next residual). Whisper: 2 + 2 layers, d_model 32, 4 heads, vocab 128, 80 mel bins; the encoder keeps
``max_source_positions=1500`` because optimum's exporter feeds 3000 frames (its default dummy
shape) and Whisper's encoder accepts exactly ``2 * max_source_positions``. The feature
extractor is WhisperFeatureExtractor's defaults (80 mel bins, 30 s at 16 kHz). Neither
exporter input needs the tokenizer or the feature extractor; they make the folder a complete
checkpoint (and are copied into the export's output).
"""

from __future__ import annotations

from pathlib import Path

SEED = 0
FAMILIES = ("t5", "bart", "whisper")


def checkpoint(family: str, folder: str | Path) -> Path:
    """Save the tiny ``family`` checkpoint ("t5", "bart" or "whisper") into ``folder``; returns it."""
    import torch
    import transformers as tr

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}")
    folder = Path(folder)
    tr.set_seed(SEED)
    if family == "t5":
        config = tr.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                             num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                             pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        model = tr.T5ForConditionalGeneration(config)
    elif family == "bart":
        config = tr.BartConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2,
                               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                               decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=3,
                               eos_token_id=1, decoder_start_token_id=1, forced_eos_token_id=None)
        model = tr.BartForConditionalGeneration(config)
    else:
        config = tr.WhisperConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=1500,
                                  max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[])
        model = tr.WhisperForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(SEED + 1)
    count = 0
    with torch.no_grad():
        for module in model.modules():
            # T5's norm is T5LayerNorm (an RMSNorm without bias); Whisper's are torch LayerNorms
            if not (isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))):
                continue
            module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
            count += 1
    assert count > 0, f"no norm found in {family}"
    model.eval().save_pretrained(folder)
    if family in ("t5", "bart"):
        _tokenizer().save_pretrained(folder)
    else:
        tr.WhisperFeatureExtractor().save_pretrained(folder)
    return folder


def _tokenizer():
    """A word-level tokenizer over the 128 ids: <pad>=0, </s>=1, <unk>=2 (T5's ids), t3..t127."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), 128)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=64)
