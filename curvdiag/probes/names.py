"""The names of the probes, in report order, without importing torch: the command line's
``--probes`` help lists them at ``--help`` time (the runner imports the probes themselves)."""

PROBES = ("lambda_max", "hessian_trace", "hessian_diag", "hesscale_diag", "directional_curvature", "glass", "power_law",
          "spectral_density")
