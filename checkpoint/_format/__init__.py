"""The checkpoint format: the state tree, the manifest, the zarr layout, boxes and dtypes."""
