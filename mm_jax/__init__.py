"""mm_jax: the MultiModel of "One Model To Learn Them All" as a JAX/Flax trainer."""
