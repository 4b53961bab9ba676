"""AVA data: annotation readers, frame timing, clip transforms, the prepare stage and datasets."""
