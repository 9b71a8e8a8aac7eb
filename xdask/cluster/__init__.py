"""The Dask side of xdask: model actors, the registry plugin, placement, streaming."""
