"""Word lists of the RULER generators, written for this package (RULER draws its words from the
``wonderwords`` package, which we do not depend on): 293 adjectives and 370 nouns, lowercase
ASCII, no word in both lists.

* NIAH keys of type ``words`` are ``adjective-noun`` pairs (RULER's form, e.g. ``gentle-harbor``).
* Common-words extraction draws distinct words from :data:`WORDS`; past its size (prompts over
  about 16K tokens) it draws from the ``adjectivenoun`` compounds (:func:`word_pool`), as RULER
  moves to a larger list.
"""

from __future__ import annotations

from functools import cache


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


ADJECTIVES = _words(
    """
able acid active actual afraid agile alert alive amber ample ancient angry annual anxious arctic
ashen awake aware bare basic bitter bland blank blind blond blue bold brave brief bright brisk
broad broken bronze brown busy calm candid careful casual cheap cheerful chilly civil clean
clear clever close cloudy coarse cold common cool cosmic crisp cruel curious curly damp dark
dear deep dense dim distant dizzy double dry dull dusty eager early east easy elder empty equal
even exact faint fair false famous fancy far fast fierce final fine firm flat fluffy foggy fond
formal fragile free fresh frosty frozen full funny gentle giant glad global gloomy golden good
grand grave gray great green grim gross gummy hairy handy happy hard harsh hasty heavy hidden
high hollow honest hot huge humble hungry icy idle inner iron jolly juicy keen kind large late
lazy lean legal level light little lively local lonely long loose loud lovely loyal lucky lunar
major mellow merry mild minor misty modern modest moist narrow nasty near neat nervous new nice
noble noisy normal north novel odd old open orange outer pale plain plastic polite poor proud
purple quick quiet rapid rare raw ready real red rich rigid ripe rough round royal rude rural
rusty sacred sad safe salty sandy scarlet secret serious shallow sharp shiny short shy silent
silky silver simple sleepy slim slow small smart smooth soft solar solid sour south spare spicy
stable steady steep sticky stiff stormy strange strict strong sturdy sudden sunny super sweet
swift tall tame tender thick thin tidy tiny tired tough tropical true ugly unique upper urban
vacant vague valid vast velvet violet vital vivid warm wary weak wealthy weary west wet white
whole wide wild windy wise witty wooden young zealous
"""
)

NOUNS = _words(
    """
acorn actor adult airport album anchor angle animal ankle apple apron arch arena army arrow
artist atlas attic autumn avenue baby badge bagel bakery balcony ball banana band banjo bank
barn barrel basket bath beach beacon bean bear beard bed bee beetle bell belt bench berry
bicycle bird blanket blossom boat bone book boot bottle boulder bowl box bracelet branch bread
brick bridge broom brush bucket buffalo bugle butter button cabin cable cactus cake camel camera
camp canal candle canoe canyon captain card carpet carrot castle cat cave cellar chain chair
chalk cheese cherry chess chicken chimney circle city clock cloud clover coast coat coffee coin
comet compass cookie copper corner cottage cotton cousin cow crab crane crayon creek cricket
crown cup curtain cushion daisy dancer deer desert desk diamond dinner doctor dog doll dolphin
donkey door dragon drawer dream drum duck eagle earth egg elbow elephant engine falcon farm
feather fence fern ferry field finger fire fish flag flame flower flute fog forest fork fountain
fox frog garden garlic gate ghost giraffe glass glove goat gold goose grape grass guitar hammer
harbor harp hat hawk heart hedge helmet hill hive honey horse hotel house island jacket jar
jelly jewel judge kettle key kite kitten knee knife ladder lake lamp lantern leaf lemon letter
library lily lion lizard lobster locket magnet mango map maple market meadow melon mirror mitten
monkey moon moose mountain mouse mushroom needle nest net night oak ocean office olive onion
orchard otter owl oyster paddle page palace panda paper parrot pasta peach pear pebble pencil
penguin pepper piano picnic pie pillow pilot pine pipe planet plum pocket pond poppy potato
pumpkin puzzle queen quilt rabbit radio rain raven ribbon river road robin rocket roof rose
saddle sail salad salmon sand scarf school seal shadow shell ship shoe shovel silk sister sky
sled snail snake snow soap sock sofa spider spoon squirrel stamp star statue stone storm stream
street sugar summer sun swan sweater table tail teacher teapot tent thunder ticket tiger toast
tomato tooth tower town toy tractor train tree truck trumpet tulip tunnel turtle umbrella valley
vase violin wagon wall walnut wand whale wheat wheel whistle willow window wing winter wizard
wolf wood yacht zebra
"""
)

#: every word, sorted
WORDS = tuple(sorted(ADJECTIVES + NOUNS))


@cache
def _compounds() -> tuple[str, ...]:
    return tuple(dict.fromkeys(a + b for a in ADJECTIVES for b in NOUNS))


def word_pool(n: int) -> tuple[str, ...]:
    """At least ``n`` distinct words: :data:`WORDS`, or the ``adjectivenoun`` compounds when ``n``
    passes it (``ValueError`` past those too)."""
    if n <= len(WORDS):
        return WORDS
    pool = _compounds()
    if n > len(pool):
        raise ValueError(f"{n} distinct words asked; the word lists make at most {len(pool)}")
    return pool
