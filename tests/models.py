"""Tiny Hugging Face models built from configs (no downloads) for the model-level tests."""
import torch
import transformers

transformers.logging.set_verbosity_error()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=3, max_position_embeddings=64,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def tokens(batch=2, seq=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 64, (batch, seq), generator=g)


def logits(model, ids):
    return model(input_ids=ids).logits


def randomize_adapters(model, seed=3, std=0.2):
    """Move every adapter away from its init (B random, DoRA magnitudes scaled) so outputs differ."""
    import lora_kernels as lk

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lk.model.lora_layers(model).values():
            for a in layer.adapters.values():
                a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * std)
                if a.lora_magnitude is not None:
                    a.lora_magnitude.mul_(1 + 0.2 * torch.rand(a.lora_magnitude.shape, generator=g))


class SeededDropout(torch.nn.Module):
    """PEFT-side stand-in for nn.Dropout drawing its seed as lora_kernels does (torch's generator), so
    both sides use identical masks when run after the same torch.manual_seed."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        from lora_kernels.dropout import apply_dropout, draw_seed

        if not self.training:
            return x
        return apply_dropout(x.reshape(-1, x.shape[-1]), draw_seed(), self.p).reshape(x.shape)
