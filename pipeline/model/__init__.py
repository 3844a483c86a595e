"""The math: preprocessing, the truncated SVD, the closed forms of Eq. 1 and Eq. 2, the cosine-trained model, one fit of them all, and the lambda sweep."""
