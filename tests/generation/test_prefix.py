"""prefix.reusable_prefix: the one rule of what an earlier prompt's keys and values give a new one."""
import numpy as np

from mindone_idefics3.prefix import image_spans, reusable_prefix

IMG = 9  # the <image> token id here; 2 tokens per tile


def spans(ids, tiles, keys=None):
    return image_spans(np.array(ids), IMG, 2, tiles, keys)


def test_common_ids_up_to_the_first_difference_and_one_token_left():
    cached = np.array([1, 2, 3, 4, 5])
    assert reusable_prefix(cached, [], np.array([1, 2, 3, 7, 8]), []) == 3
    assert reusable_prefix(cached, [], np.array([1, 2, 3, 4, 5]), []) == 4  # the same prompt: its last token runs
    assert reusable_prefix(cached, [], np.array([1, 2, 3, 4, 5, 6, 7]), []) == 5
    assert reusable_prefix(cached, [], np.array([8, 2, 3]), []) == 0
    assert reusable_prefix(np.array([], np.int64), [], np.array([1, 2]), []) == 0


def test_an_image_counts_only_when_it_is_the_same_image_at_the_same_place():
    ids = [1, IMG, IMG, IMG, IMG, 2, 3]  # one image of 2 tiles at 1..5
    same = spans(ids, [2], ["a"])
    assert reusable_prefix(np.array(ids), same, np.array(ids + [4]), spans(ids + [4], [2], ["a"])) == 7
    other = spans(ids + [4], [2], ["b"])  # the same ids, another picture: back to the image's start
    assert reusable_prefix(np.array(ids), same, np.array(ids + [4]), other) == 1


def test_a_match_never_ends_inside_an_image():
    cached = [1, IMG, IMG, IMG, IMG, 2]
    new = [1, IMG, IMG, 5]  # hypothetical: differs inside the image's tokens
    assert reusable_prefix(np.array(cached), spans(cached, [2], ["a"]), np.array(new + [IMG, IMG, 6]),
                           spans(new + [IMG, IMG, 6], [1, 1], ["a", "c"])) == 1
    # the cached prompt ends inside where the new one has an image
    short = [1, IMG, IMG]
    assert reusable_prefix(np.array(short), spans(short, [1], ["a"]), np.array(cached),
                           spans(cached, [2], ["a"])) == 1


def test_two_images_the_second_one_changed():
    ids = [1, IMG, IMG, 2, IMG, IMG, 3]
    cached_spans = spans(ids, [1, 1], ["a", "b"])
    assert reusable_prefix(np.array(ids), cached_spans, np.array(ids + [5]), spans(ids + [5], [1, 1], ["a", "x"])) == 4
