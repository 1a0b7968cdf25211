"""Real-scale check: the cached starter path (StarterTarget.validate) on Flickr8k dev with the v1 weights,
before any training, must reproduce v1's dev numbers (t2i R@1 27.9)."""

import json, time, torch
from pathlib import Path

torch.set_num_threads(2)
from calibclip.data.captions import load_flickr8k
from calibclip.models.registry import create_model
from calibclip.training.config import load_train_settings
from calibclip.training.targets import StarterTarget, train_data

root = "/work/shared/data/flickr8k"
s = load_train_settings("configs/flickr8k.yaml", {"trainable": "top"})
dev = load_flickr8k(root, "dev")
t = time.time()
target = StarterTarget(create_model("starter"), s, train_data(dev), Path("/tmp/calibclip-v2-cache"), [dev])
t_cache = time.time() - t
t = time.time()
m = target.validate(dev)
print(json.dumps({"cache_seconds": round(t_cache, 1), "validate_seconds": round(time.time() - t, 1), **m}), flush=True)
