def train(ctx):
    model = ctx.build_model()
    for batch in ctx.iter_train_batches(model):
        batch.loss.backward()
