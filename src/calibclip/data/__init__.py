"""Image decoding and transforms, folder scanning, dataset loaders."""
