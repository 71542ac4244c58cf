"""tunnelwatch's monitoring side: the vocabulary (model, errors, config) and the command line
here; measure/ the network, store/ the disk, fleet/ the upload to a central store, daemon/ the
process that runs them on a schedule (README: Layout)."""
