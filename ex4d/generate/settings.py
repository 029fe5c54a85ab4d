"""The EX-4D release's generation settings, as named constants (no torch here).

Values are facts about the public release (Wan2.1-I2V-14B-480P + the EX-4D adapter); see
docs/generate.md for where each comes from. Change them per call, never here.
"""

from __future__ import annotations

from dataclasses import dataclass

# The release always renders and generates at this size and length.
RELEASE_WIDTH = 512
RELEASE_HEIGHT = 512
RELEASE_FRAMES = 49
RELEASE_STEPS = 25
RELEASE_CFG = 5.0
RELEASE_SIGMA_SHIFT = 5.0
RELEASE_SEED = 0
RELEASE_FPS = 15  # the release saves its output at 15 fps

# Wan's VAE compresses 4 frames into one latent frame after the first; space by 8; the DiT patch is 2x2.
TIME_FACTOR = 4
SIZE_MULTIPLE = 16

# Mask preparation: erosion with a k x k kernel, k uniform in [2, 8] per frame, then binarise at 0.5.
EROSION_MIN = 2
EROSION_MAX = 8
MASK_THRESHOLD = 0.5

# The release's fixed prompt and its negative prompt (the English form of Wan's usual negative prompt).
EX4D_PROMPT = (
    "4K ultra HD, surround motion, realistic tone, panoramic shot, wide-angle view, cinematic quality"
)
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
    "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
    "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
    "fused fingers, still picture, messy background, three legs, many people in the background, "
    "walking backwards"
)

# Adapter: LoRA on these DiT module-name suffixes (self/cross attention q,k,v,o and both FFN linears).
LORA_RANK = 16
LORA_ALPHA = 16.0
LORA_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")

# Long clips: windows of the model's length that overlap by this many frames and cross-fade.
WINDOW_OVERLAP = 8

MEMORY_MODES = ("resident", "offload", "fp8", "stream")
GENERATOR_NAMES = ("ex4d", "draft", "tiny")

# Speed: "fast" = the levers measured in `ex4d bench` (docs/benchmarks.md), "fastest" = fast + FP8
# self-attention (cuDNN), "reference" = the release's way.
SPEEDS = ("fast", "fastest", "reference")
DEFAULT_SPEED = "fast"

# Memory mode "stream": GPU memory kept free beside the weights for the activations of a 512x512x49 shot
# (largest stage: text encoding / VAE decode; measured in the 24 and 16 GiB runs of docs/benchmarks.md).
STREAM_ACTIVATION_RESERVE_GIB = 2.5
# ... and what the CUDA context and allocator slack take when the budget is the whole card.
STREAM_CARD_RESERVE_GIB = 1.0


@dataclass(frozen=True)
class SamplingSettings:
    """Per-call sampling settings; defaults are the release's."""

    steps: int = RELEASE_STEPS
    cfg: float = RELEASE_CFG
    sigma_shift: float = RELEASE_SIGMA_SHIFT
    seed: int = RELEASE_SEED
    prompt: str = EX4D_PROMPT
    negative_prompt: str = WAN_NEGATIVE_PROMPT
