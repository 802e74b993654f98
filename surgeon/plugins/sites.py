"""Built-in site finders: residual, stage, after_conv, pool."""
from surgeon.hookspecs import hookimpl


@hookimpl
def register_site_finders(register):
    from surgeon.surgery import sites

    register("residual", sites.find_residual, summary="on the residual branch, just before the add")
    register("stage", sites.find_stage, summary="end of a stage that a downsampling follows")
    register("after_conv", sites.find_after_conv, summary="after a conv, past its norm and activation")
    register("pool", sites.find_pool, summary="replaces a pooling op (and a flatten right after it)")
