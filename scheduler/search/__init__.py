"""The plan search: what a policy may place (`planning`), the solvers that choose among the
placements with the performance model (`solver`, `bruteforce`), stable SM groups (`groups`) and
the policies themselves (`policies/`, registered by name). Pure: the world in, a plan out."""
