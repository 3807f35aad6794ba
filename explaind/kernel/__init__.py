"""The exact path-kernel engine: quadrature, torch.func features, momentum sweeps, Attribution."""
