"""Encoders: the `Encoder` interface, CLIP (ViT, ModifiedResNet), the built-in `starter`, registry and loaders."""
