"""assemble_snapshot.py WORK SNAPSHOT_DIR OUT: a shapes-sd pipeline folder from a denoiser snapshot (vae, tokenizer from WORK)."""
import sys
from pathlib import Path
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts")); sys.path.insert(0, str(REPO))
import train_offline_diffusion as t
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer
work, snap, out = map(Path, sys.argv[1:4])
tok = CLIPTokenizer.from_pretrained(work / "tokenizer")
_, sched = t.noise_schedulers()
pipe = StableDiffusionPipeline(vae=AutoencoderKL.from_pretrained(work / "vae"),
    text_encoder=CLIPTextModel.from_pretrained(snap / "text_encoder"), tokenizer=tok,
    unet=UNet2DConditionModel.from_pretrained(snap / "unet"), scheduler=sched,
    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
pipe.save_pretrained(out)
t.copy_tokenizer(work / "tokenizer", out / "tokenizer")
print("saved", out)
