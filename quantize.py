"""
Weight-only quantization: the weights of the blocks stored in 8 or 4 bits, as gpt-fast's quantize.py.

Decoding streams every weight from memory once per token, so storing the weights of the blocks in
8 or 4 bits instead of 32 or 16 is the largest decode speed-up left, and makes a frozen LoRA base
(QLoRA) 4 to 8 times smaller. Weight-only and symmetric: the activations stay in floating point,
and a weight w stands for q * scale with q a small integer.

    int8  one scale per output row (absmax / 127), q in -127..127
    int4  one scale per group_size consecutive inputs of a row (absmax / 7), q in -7..7, two a byte

quantize(model, bits, group_size) replaces the weight Parameter of each Linear of the blocks by a
QuantizedWeight, which model.Linear calls to multiply (model.py knows nothing more of it). Each
matmul then takes one of two paths that compute the same product up to rounding: "kernel",
PyTorch's own (QUANT_KERNELS), which reads the integers; "dequantize", which rebuilds the weight in
the activation dtype, always possible. Which is faster depends on the CPU, the dtype and the rows
(README, Quantization), so nothing is assumed: without gradients, for up to QUANT_MAX_ROWS rows,
the two are timed once per (bits, group, shape, rows rounded up to a power of two, dtype, device,
threads) and the kernel is kept only where autotune.faster says so (QUANT_PATHS; QUANT_FORCE
overrides). Longer prefills and training always dequantize: there the matmul is compute-bound and
one dequantized weight serves every row. Under autograd the weight is dequantized again in the
backward pass instead of being kept from the forward (_DequantizedMatmul): no layer's
full-precision copy outlives its matmul, which is what keeps a QLoRA base small while it trains.

    python sample.py --out_dir=out-shakespeare --quantize=int4 --dtype=bfloat16
    python sft.py config/sft_tasks_lora.py --quantize=int4 --out_dir=out-sft-qlora   # QLoRA
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from autotune import faster
from model import Linear, linear_role, lora_layers

QUANT_PATHS = {}  # (bits, group_size, out, in, rows bucket, dtype, device type, threads) -> "kernel" | "dequantize"
QUANT_FORCE = None  # None (measure) | "kernel" | "dequantize"
QUANT_MAX_ROWS = 64  # more rows than this: the dequantize path, unmeasured
QUANT_KERNELS = {  # (device type, bits) -> the kernel the "kernel" path calls, where torch has it for the device
    ("cpu", 8): "torch._weight_int8pack_mm",
    ("cuda", 8): "torch._weight_int8pack_mm",
    ("cpu", 4): "torch._weight_int4pack_mm_for_cpu",
    ("cuda", 4): "torch._weight_int4pack_mm",
}
QUANT_FORMATS = {  # what a checkpoint's "quantization" entry says of its tensors
    8: "int8: W.q int8 (out, in), W.scale (out,) in the model's dtype; W = q * scale[:, None]",
    4: "int4: W.q uint8 (out, in/2), byte j of a row = (q[2j] + 8) << 4 | (q[2j+1] + 8); W.scale (out, "
       "in/group_size) in the model's dtype; W[n, k] = q[n, k] * scale[n, k // group_size]",
}


def quantize_int8(w):
    """Symmetric int8 with one scale per output row: w (out, in) -> q int8 (out, in), scale (out,):

        scale[n] = max_k |w[n, k]| / 127,    q[n, k] = round(w[n, k] / scale[n])  in -127..127

    so that |w - q scale| <= scale / 2 everywhere. The scale is rounded to w's dtype first and q is
    computed against the rounded scale, so the bound holds for the scale as it is stored (a bf16
    rounding moves the largest |w| / scale to below 127.5, which still rounds to 127)."""
    w32 = w.float()
    scale = (w32.abs().amax(dim=1) / 127).to(w.dtype)
    s = scale.float().clamp(min=torch.finfo(torch.float32).tiny)[:, None]  # a zero row: q = 0
    return torch.round(w32 / s).clamp(-127, 127).to(torch.int8), scale


def dequantize_int8(q, scale, dtype):
    """q scale, (out, in) in dtype."""
    return q.to(dtype) * scale.to(dtype)[:, None]


def pack_int4(q):
    """Integers q (out, in) in -8..7 -> uint8 (out, in/2): byte j of a row holds q[2j] + 8 in its
    high four bits and q[2j+1] + 8 in its low four (the layout torch's CUDA int4 kernel packs from)."""
    u = (q + 8).to(torch.uint8)
    return u[:, 0::2] << 4 | u[:, 1::2]


def unpack_int4(packed):
    """The inverse of pack_int4: uint8 (out, in/2) -> int8 (out, in) in -8..7."""
    nibbles = torch.stack((packed >> 4, packed & 15), dim=-1)  # (out, in/2, 2): the high one first
    return nibbles.view(packed.size(0), -1).to(torch.int8) - 8


def quantize_int4(w, group_size):
    """Symmetric int4 in groups of group_size consecutive inputs: w (out, in) -> packed uint8
    (out, in/2) (see pack_int4), scale (out, in/group_size):

        scale[n, g] = max |w[n, gG : (g+1)G]| / 7,    q[n, k] = round(w[n, k] / scale[n, k // G])  in -7..7

    so that |w - q scale| <= scale / 2 in every group (-8 stays unused: the range is symmetric).
    As in quantize_int8 q is computed against the scale as stored."""
    out, n_in = w.shape
    w32 = w.float().view(out, n_in // group_size, group_size)
    scale = (w32.abs().amax(dim=-1) / 7).to(w.dtype)
    s = scale.float().clamp(min=torch.finfo(torch.float32).tiny)[..., None]
    q = torch.round(w32 / s).clamp(-7, 7).view(out, n_in).to(torch.int8)
    return pack_int4(q), scale


def dequantize_int4(packed, scale, dtype):
    """q scale, group by group, (out, in) in dtype."""
    q = unpack_int4(packed)
    out, n_in = q.shape
    return (q.view(out, scale.size(1), -1).to(dtype) * scale.to(dtype)[..., None]).view(out, n_in)


class QuantizedWeight(nn.Module):
    """The weight of a Linear in 8 or 4 bits (quantize_int8, quantize_int4), in place of its weight
    Parameter: the state dict holds c_q.weight.q and c_q.weight.scale (QUANT_FORMATS), and the
    Linear calls it to multiply (forward). Frozen: nothing in it has a gradient; LoRA adapters
    train beside it."""

    def __init__(self, weight, bits, group_size=None):
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.out_features, self.in_features = weight.shape
        with torch.no_grad():
            q, scale = quantize_int8(weight) if bits == 8 else quantize_int4(weight, group_size)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.kernel_int4 = None  # (device, dtype, packed, scale_and_zeros) as torch's int4 kernel reads them
        self.last_path = None  # the path of the last matmul without gradients, for bench.py

    def forward(self, x, bias=None):
        """x W^T + b, computed in the activation dtype: autocast's when it is on (torch's int
        kernels are not on autocast's lists), else x's."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x2 = x.reshape(-1, x.size(-1)).to(dtype).contiguous()  # (rows, in): the kernels take 2-D inputs
        if torch.is_grad_enabled() and x2.requires_grad:
            y = _DequantizedMatmul.apply(x2, self.q, self.scale, self.bits)
        else:
            path = _quantized_path(x2, self)
            kernel = QUANT_KERNELS.get((x.device.type, self.bits), "kernel")
            self.last_path = kernel if path == "kernel" else "dequantize"
            y = _quantized_matmul(x2, self, path)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias.to(dtype)

    def numel(self):
        return self.out_features * self.in_features

    def dequantize(self, dtype=None):
        """The weight (out, in) it stands for, in dtype (default the scale's, the model's)."""
        dequantize = dequantize_int8 if self.bits == 8 else dequantize_int4
        return dequantize(self.q, self.scale, dtype or self.scale.dtype)

    def int4_kernel_weight(self, device, dtype):
        """The weight and scales as torch's int4 kernel on this device takes them: its own packing of
        the nibbles (made here, once, and kept beside q: another half byte per weight while the
        kernel is in use) and (scale, zero) pairs (in/G, out, 2) in dtype, zero 0 (symmetric)."""
        if self.kernel_int4 is None or self.kernel_int4[:2] != (device, dtype):
            if device.type == "cuda":  # packs from our layout; inner k tiles: the largest that fits
                tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)
                packed = torch._convert_weight_to_int4pack(self.q, tiles)
            else:  # the CPU kernel packs from one int32 per weight, 0..15 (it subtracts the 8)
                packed = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(self.q).to(torch.int32) + 8, 2)
            scale = self.scale.to(dtype).t()
            self.kernel_int4 = (device, dtype, packed, torch.stack((scale, torch.zeros_like(scale)), -1).contiguous())
        return self.kernel_int4[2:]

    def extra_repr(self):
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"int{self.bits}{group}, in_features={self.in_features}, out_features={self.out_features}"



def _dequantized_matmul(x, q, scale, bits):
    """x (rows, in) W^T for W = q scale, rebuilt in x's dtype."""
    if bits == 8:  # x (q scale)^T = (x q^T) scale: the row scales factor out of the matmul
        return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    return F.linear(x, dequantize_int4(q, scale, x.dtype))


def _quantized_matmul(x, w, path):
    """x (rows, in) W^T -> (rows, out), in x's dtype, by path "kernel" or "dequantize"."""
    if path == "dequantize":
        return _dequantized_matmul(x, w.q, w.scale, w.bits)
    if w.bits == 8:
        return torch._weight_int8pack_mm(x, w.q, w.scale.to(x.dtype))
    packed, scale_and_zeros = w.int4_kernel_weight(x.device, x.dtype)
    if x.is_cuda:
        return torch._weight_int4pack_mm(x, packed, w.group_size, scale_and_zeros)
    return torch._weight_int4pack_mm_for_cpu(x, packed, w.group_size, scale_and_zeros)


def _quantized_path(x, w):
    """The path for x (rows, in) times w without gradients, measured (see QUANT_PATHS above)."""
    rows = x.size(0)
    if rows > QUANT_MAX_ROWS:
        return "dequantize"
    bucket = 1 << (rows - 1).bit_length()  # a prompt of any length up to 64 costs at most 7 measurements
    key = (w.bits, w.group_size, w.out_features, w.in_features, bucket, x.dtype, x.device.type, torch.get_num_threads())
    path = QUANT_FORCE or QUANT_PATHS.get(key)
    if path is None:
        try:  # a kernel that refuses this input (its dtype, its shape, this device) is no candidate
            _quantized_matmul(x, w, "kernel")
            kernel = faster(lambda: _quantized_matmul(x, w, "dequantize"), lambda: _quantized_matmul(x, w, "kernel"),
                            x.device)
        except (RuntimeError, NotImplementedError):
            kernel = False
        path = QUANT_PATHS[key] = "kernel" if kernel else "dequantize"
        if not kernel:
            w.kernel_int4 = None  # not used: give its memory back
    return path


class _DequantizedMatmul(torch.autograd.Function):
    """x W^T for a frozen quantized W under autograd. F.linear on the dequantized W would keep that
    full-precision W alive until the backward pass, for every layer at once; this keeps only the
    integers and dequantizes again for dx = dy W. W gets no gradient."""

    @staticmethod
    def forward(ctx, x, q, scale, bits):
        ctx.save_for_backward(q, scale)
        ctx.bits = bits
        return _dequantized_matmul(x, q, scale, bits)  # what the same rows compute without autograd

    @staticmethod
    def backward(ctx, dy):
        q, scale = ctx.saved_tensors
        if ctx.bits == 8:  # dy (q scale) = (dy scale) q
            return (dy * scale.to(dy.dtype)) @ q.to(dy.dtype), None, None, None
        return dy @ dequantize_int4(q, scale, dy.dtype), None, None, None



# -----------------------------------------------------------------------------
# quantizing a model


@torch.no_grad()
def quantize(model, bits, group_size=None, quantize_head=False):
    """Store the weight of every linear layer of the model's blocks in bits = 8 (int8, a scale per
    output row) or 4 (int4, a scale per group_size = 32 | 64 | 128 inputs, two weights a byte),
    weight-only and symmetric (see quantize_int8, quantize_int4). Quantize in the dtype the model
    will run in: the scales are stored in it. -> the model. Refused with a ValueError naming the
    setting: other bits, a group_size that does not divide a layer's input width, a model already
    quantized, LoRA adapters merged into the weights (the base must be the pretrained one).

    Left in floating point: the MoE routers (n_expert x n_embd, a rounding error there changes
    which expert a token goes to rather than nudging an output), the scalar head, the norms, and
    unless quantize_head the token embedding and LM head: the head's logits are the most
    precision-sensitive numbers of the model (every weight of it moves every logit of the
    softmax), and a tied head is the embedding table itself. With quantize_head a tied head gets
    a quantized copy of the table for its matmul, the lookup keeps the table.

    LoRA adapters stay in full precision beside a quantized weight and train on it (QLoRA): add
    them first (lora_rank in the config), then quantize. state_dict() then holds the integers and
    scales (QUANT_FORMATS) and the adapters; convert.merged_state_dict(model) the merged weights, dequantized."""
    if bits not in (8, 4):
        raise ValueError(f"quantize: bits={bits!r}: 8 (int8, a scale per output row) or 4 (int4, group-wise)")
    if bits == 8 and group_size is not None:
        raise ValueError(f"quantize: group_size={group_size}: int8 has one scale per output row, no groups "
                         "(group_size is for bits=4)")
    if bits == 4 and group_size not in (32, 64, 128):
        raise ValueError(f"quantize: group_size={group_size!r}: int4 groups are 32, 64 or 128 inputs")
    if model.quantization:
        raise ValueError(f"quantize: the model is already int{model.quantization['bits']}; quantize once, "
                         "from the full-precision weights")
    if any(layer.merged for layer in lora_layers(model)):
        raise ValueError("quantize: the LoRA adapters are merged into the weights (merge_lora); unmerge_lora "
                         "first: a quantized base keeps its adapters beside it")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)
              and linear_role(name) != "router" and (name != "lm_head" or quantize_head)]
    for name, m in layers:
        if bits == 4 and m.in_features % group_size:
            raise ValueError(f"quantize: group_size={group_size} does not divide the input width "
                             f"{m.in_features} of {name}")
    for name, m in layers:  # the float weight is freed as its layer is done
        weight = m.weight.detach()
        del m.weight  # a Parameter's name takes only a Parameter: free it for the module
        m.weight = QuantizedWeight(weight, bits, group_size)
        del weight
    model.quantization = dict(bits=bits, group_size=group_size, quantize_head=quantize_head, format=QUANT_FORMATS[bits])
    return model


def quantize_like(model, quantization):
    """Give a fresh model the layout a checkpoint's "quantization" entry describes, so that the
    stored integers and scales load into it (load_state_dict)."""
    return quantize(model, quantization["bits"], quantization["group_size"], quantization["quantize_head"])


def quantized_weights(model):
    return [m for m in model.modules() if isinstance(m, QuantizedWeight)]


QUANTIZE = {"none": None, "int8": 8, "int4": 4}  # a stage's quantize setting -> bits


def quantize_model(model, setting, group_size=64, trains=False):
    """A stage's quantize setting applied to a model: none | int8 | int4, int4 in groups of
    group_size inputs (the stage's quant_group_size). A model loaded quantized keeps the format it
    was stored in: asking for another is refused (quantizing twice compounds the rounding), as is
    training a quantized model without adapters (trains and lora_rank 0: its quantized weights
    are frozen, so only the norms and the embedding would learn). -> the model; ValueError naming
    the setting."""
    if setting not in QUANTIZE:
        raise ValueError(f"quantize must be none | int8 | int4, got {setting!r}")
    bits = QUANTIZE[setting]
    stored = model.quantization
    if bits is not None and stored and (stored["bits"], stored["group_size"]) != (bits, group_size if bits == 4 else None):
        group = f" in groups of {stored['group_size']}" if stored["bits"] == 4 else ""
        raise ValueError(f"quantize={setting}: the checkpoint is stored as int{stored['bits']}{group}; quantizing it "
                         f"again would compound the rounding (load it with quantize=none, as stored)")
    if bits is not None and not stored:
        try:
            quantize(model, bits, group_size if bits == 4 else None)
        except ValueError as e:
            raise ValueError(f"quantize={setting} (quant_group_size={group_size}): {e}") from None
    if trains and model.quantization and model.config.lora_rank == 0:
        raise ValueError(f"quantize: an int{model.quantization['bits']} model trains only with adapters on its "
                         "frozen weights (lora_rank > 0, QLoRA), or is evaluated (eval_only=True)")
    return model
