"""addpipe.pipeline"""
