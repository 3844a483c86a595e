"""The lists: top-N neighbour lists in chunks on the workers, their held-out evaluation and the cosine audit."""
