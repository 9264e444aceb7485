"""The mini world's builders: shapes and their captions, the tokenizer, mini CLIP, mini Stable
Diffusion, the judge, and the measures of their quality. They may use the filter library
(``pipeline.espresso``); the library never uses them, and they never use a DVC stage."""
