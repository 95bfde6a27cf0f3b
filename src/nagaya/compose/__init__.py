"""`nagaya compose`: a compose-spec subset run inside one job (spec.py: models; placement.py: nodes; stack.py: run)."""
