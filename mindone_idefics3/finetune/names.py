"""The module names `--lora-targets` takes (no MindSpore here: the command line's --help stays fast)."""

TEXT_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
DEFAULT_TARGETS = ",".join(TEXT_NAMES)
TARGET_HELP = (f"comma-separated PEFT module names: text model {', '.join(TEXT_NAMES)}; the connector's 'proj'; "
               f"vision tower 'vision.<name>' ({', '.join(VISION_NAMES)}); 'lm_head' (untied models); or "
               "'all-linear' (every linear layer but lm_head, as PEFT)")
