"""The trained model's home: its typed manifest, its files on disk, and its one network.

- `manifest.py`: `Manifest`, the typed, versioned description of a bundle (the only code that knows
  manifest keys), validated against `manifest.schema.json` on load;
- `store.py`: saving and loading bundle folders (every file hashed, nothing unlisted) and reading
  their side files;
- `signature.py`: the bundle digest (its identity) and the optional HMAC signature over it;
- `network.py`: `Network`, uint8 pixels -> (logits, pooled features), used by training, prediction,
  explanation and export alike.
"""

from .store import Bundle, load_bundle, save_bundle

__all__ = ["Bundle", "load_bundle", "save_bundle"]
