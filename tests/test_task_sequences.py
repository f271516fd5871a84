"""The task-sequence registry: LIBERO's suites in LIBERO's order, Continual World, aliases, errors."""

from __future__ import annotations

import re

import pytest

from cl_vla.data import TaskSequence, get_task_sequence, list_task_sequences
from cl_vla.errors import ConfigError

# LIBERO's own task order, copied from libero/benchmark/libero_suite_task_map.py (its task names; an
# instruction is the name without the scene prefix, with spaces for underscores).
LIBERO_TASK_MAP = {
    "libero_spatial": [
        "pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate",
        "pick_up_the_black_bowl_next_to_the_ramekin_and_place_it_on_the_plate",
        "pick_up_the_black_bowl_from_table_center_and_place_it_on_the_plate",
        "pick_up_the_black_bowl_on_the_cookie_box_and_place_it_on_the_plate",
        "pick_up_the_black_bowl_in_the_top_drawer_of_the_wooden_cabinet_and_place_it_on_the_plate",
        "pick_up_the_black_bowl_on_the_ramekin_and_place_it_on_the_plate",
        "pick_up_the_black_bowl_next_to_the_cookie_box_and_place_it_on_the_plate",
        "pick_up_the_black_bowl_on_the_stove_and_place_it_on_the_plate",
        "pick_up_the_black_bowl_next_to_the_plate_and_place_it_on_the_plate",
        "pick_up_the_black_bowl_on_the_wooden_cabinet_and_place_it_on_the_plate",
    ],
    "libero_object": [
        "pick_up_the_alphabet_soup_and_place_it_in_the_basket",
        "pick_up_the_cream_cheese_and_place_it_in_the_basket",
        "pick_up_the_salad_dressing_and_place_it_in_the_basket",
        "pick_up_the_bbq_sauce_and_place_it_in_the_basket",
        "pick_up_the_ketchup_and_place_it_in_the_basket",
        "pick_up_the_tomato_sauce_and_place_it_in_the_basket",
        "pick_up_the_butter_and_place_it_in_the_basket",
        "pick_up_the_milk_and_place_it_in_the_basket",
        "pick_up_the_chocolate_pudding_and_place_it_in_the_basket",
        "pick_up_the_orange_juice_and_place_it_in_the_basket",
    ],
    "libero_goal": [
        "open_the_middle_drawer_of_the_cabinet",
        "put_the_bowl_on_the_stove",
        "put_the_wine_bottle_on_top_of_the_cabinet",
        "open_the_top_drawer_and_put_the_bowl_inside",
        "put_the_bowl_on_top_of_the_cabinet",
        "push_the_plate_to_the_front_of_the_stove",
        "put_the_cream_cheese_in_the_bowl",
        "turn_on_the_stove",
        "put_the_bowl_on_the_plate",
        "put_the_wine_bottle_on_the_rack",
    ],
    "libero_10": [
        "LIVING_ROOM_SCENE2_put_both_the_alphabet_soup_and_the_tomato_sauce_in_the_basket",
        "LIVING_ROOM_SCENE2_put_both_the_cream_cheese_box_and_the_butter_in_the_basket",
        "KITCHEN_SCENE3_turn_on_the_stove_and_put_the_moka_pot_on_it",
        "KITCHEN_SCENE4_put_the_black_bowl_in_the_bottom_drawer_of_the_cabinet_and_close_it",
        "LIVING_ROOM_SCENE5_put_the_white_mug_on_the_left_plate_and_put_the_yellow_and_white_mug_on_the_right_plate",
        "STUDY_SCENE1_pick_up_the_book_and_place_it_in_the_back_compartment_of_the_caddy",
        "LIVING_ROOM_SCENE6_put_the_white_mug_on_the_plate_and_put_the_chocolate_pudding_to_the_right_of_the_plate",
        "LIVING_ROOM_SCENE1_put_both_the_alphabet_soup_and_the_cream_cheese_box_in_the_basket",
        "KITCHEN_SCENE8_put_both_moka_pots_on_the_stove",
        "KITCHEN_SCENE6_put_the_yellow_and_white_mug_in_the_microwave_and_close_it",
    ],
}

# Continual World CW10 (Wolczyk et al. 2021), in its published order.
CW10_ENVS = [
    "hammer-v3",
    "push-wall-v3",
    "faucet-close-v3",
    "push-back-v3",
    "stick-pull-v3",
    "handle-press-side-v3",
    "push-v3",
    "shelf-place-v3",
    "window-close-v3",
    "peg-unplug-side-v3",
]


def _instruction(libero_task_name: str) -> str:
    return re.sub(r"^[A-Z_]+_SCENE\d+_", "", libero_task_name).replace("_", " ")


def test_libero_spatial_first_and_last_instruction() -> None:
    seq = get_task_sequence("libero_spatial")
    assert len(seq) == 10
    assert (
        seq.tasks[0] == "pick up the black bowl between the plate and the ramekin and place it on the plate"
    )
    assert seq.tasks[-1] == "pick up the black bowl on the wooden cabinet and place it on the plate"


@pytest.mark.parametrize("name", sorted(LIBERO_TASK_MAP))
def test_libero_suites_follow_libero_order(name: str) -> None:
    seq = get_task_sequence(name)
    assert isinstance(seq, TaskSequence)
    assert seq.name == name
    assert seq.suite == name
    assert len(seq.tasks) == 10
    assert list(seq.tasks) == [_instruction(t) for t in LIBERO_TASK_MAP[name]]
    assert list(seq.env_tasks) == LIBERO_TASK_MAP[name]
    assert len(set(seq.tasks)) == 10


def test_libero_long_is_an_alias_of_libero_10() -> None:
    long_, ten = get_task_sequence("libero_long"), get_task_sequence("libero_10")
    assert long_ == ten
    assert long_.name == "libero_10"
    assert long_.tasks[0] == "put both the alphabet soup and the tomato sauce in the basket"
    assert long_.tasks[-1] == "put the yellow and white mug in the microwave and close it"


def test_cw10_in_published_order() -> None:
    seq = get_task_sequence("cw10")
    assert list(seq.env_tasks) == CW10_ENVS
    assert seq.suite == "metaworld"
    assert len(seq.tasks) == 10
    assert len(set(seq.tasks)) == 10  # push and push-back have distinct instructions
    assert all(isinstance(t, str) and t.strip() for t in seq.tasks)


def test_cw20_is_cw10_twice() -> None:
    cw10, cw20 = get_task_sequence("cw10"), get_task_sequence("cw20")
    assert len(cw20) == 20
    assert cw20.tasks == cw10.tasks * 2
    assert cw20.env_tasks == cw10.env_tasks * 2


def test_mw_short() -> None:
    seq = get_task_sequence("mw_short")
    assert len(seq) == 3
    assert seq.suite == "metaworld"
    assert list(seq.env_tasks) == ["plate-slide-v3", "drawer-open-v3", "button-press-topdown-v3"]


def test_list_task_sequences_names_every_shipped_sequence() -> None:
    names = list_task_sequences()
    for name in ("libero_spatial", "libero_object", "libero_goal", "libero_10", "cw10", "cw20", "mw_short"):
        assert name in names
    assert "libero_long" not in names  # an alias, not a sequence of its own
    assert "custom" not in names  # a template without tasks


def test_unknown_sequence_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        get_task_sequence("libero_sptial")
    msg = str(info.value)
    assert "'libero_sptial'" in msg
    for name in [*list_task_sequences(), "libero_long"]:
        assert repr(name) in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("node", "fragment"),
    [
        ({"name": "empty", "tasks": []}, "has no tasks"),
        ({"name": "blank", "tasks": ["   "]}, "is not allowed"),
        ({"name": "boolean", "tasks": [True]}, "is not allowed"),
        ({"name": "str", "tasks": "turn on the stove"}, "needs 'tasks'"),
        ({"name": "pairs", "tasks": ["a", "b"], "env_tasks": ["x"]}, "pair one to one"),
    ],
)
def test_bad_inline_sequence_is_one_sentence(node: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        TaskSequence.from_mapping(node)
    assert node["name"] in str(info.value)


def test_inline_sequence_of_instructions_and_indices() -> None:
    seq = TaskSequence.from_mapping({"name": "mixed", "tasks": ["turn on the stove", 3]})
    assert seq.tasks == ("turn on the stove", 3)
    assert list(seq) == ["turn on the stove", 3]
    assert seq.env_tasks is None
