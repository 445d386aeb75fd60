"""Training primitives shared by plain and DP-SGD local training (no DP, no Flower)."""
