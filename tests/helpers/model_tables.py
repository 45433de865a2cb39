"""Model tables more than one test file trains: a Perceiver T5 with MIM hiddens (the
host-sync and compiled-graph counts hold it to the same numbers as the GPT)."""

T5_HIDDENS = {"encoder": {"arch": "perceiver"},
              "hiddens": {"enc_output_name": "z",
                          "transform": {"q_z_given_x": {"cls_name": "cond_gaussian", "hidden_size": 16}},
                          "loss": {"mim": {"cls_name": "a_mim", "loss_weight": 1.0}}}}
