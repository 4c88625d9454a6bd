"""Fixed vocabularies of the simulated world: named titles, countries, word lists.

The named titles are hand-written so tests, docs and reports can refer to them by id;
everything else in the catalog is generated from the word lists below.
"""

from __future__ import annotations

from dataclasses import dataclass

GENRES: tuple[str, ...] = (
    "action", "comedy", "drama", "romance", "thriller",
    "horror", "family", "animation", "documentary", "scifi",
)
"""The world's genres: the titles' ``genres`` and the tone an artwork conveys."""
G = {g: i for i, g in enumerate(GENRES)}

ART_FLAGS: tuple[str, ...] = ("closeup", "text_heavy", "group")
"""Latent composition attributes of an artwork (shot, text, people), in ``Catalog.art_flags`` order."""

TAG_VOCABULARIES = ("default", "unseen")
"""How a world writes its artworks' tags. ``default``: ``tone:<genre>`` and the flags by name.
``unseen``: the same latent attributes under other keys, values and flags (:data:`UNSEEN_TONE_TAGS`,
:data:`UNSEEN_FLAG_TAGS`) plus uninformative campaign labels, so a benchmark on it shows what keyart
learns from a catalog's tags rather than lists. ``cast:<id>`` is the data contract's link to the
title's cast and is the same in both."""
UNSEEN_TONE_TAGS = {
    "action": "mood:kinetic", "comedy": "mood:playful", "drama": "mood:somber", "romance": "mood:tender",
    "thriller": "mood:tense", "horror": "mood:eerie", "family": "palette:warm", "animation": "style:cartoon",
    "documentary": "style:photographic", "scifi": "palette:neon",
}
UNSEEN_FLAG_TAGS = {"closeup": "shot:close", "text_heavy": "typography", "group": "ensemble"}
CAMPAIGN_LABELS = tuple(f"campaign:{season}{year}_{k}" for season in ("spring", "summer", "fall", "winter")
                        for year in (25, 26) for k in range(6))
"""Designer campaign labels the unseen vocabulary sprinkles on artworks (no effect on members)."""

KIDS_GENRES = ("family", "animation")
KIDS_RATINGS = ("G", "PG", "TV-Y", "TV-PG")
ADULT_RATINGS = ("PG-13", "R", "TV-14", "TV-MA")

# Share of the catalog whose primary genre is g, and the adult taste Dirichlet prior.
GENRE_CATALOG_SHARE = {
    "action": 0.13, "comedy": 0.15, "drama": 0.18, "romance": 0.08, "thriller": 0.11,
    "horror": 0.07, "family": 0.09, "animation": 0.07, "documentary": 0.06, "scifi": 0.06,
}
ADULT_TASTE_ALPHA = {
    "action": 0.50, "comedy": 0.60, "drama": 0.70, "romance": 0.35, "thriller": 0.45,
    "horror": 0.25, "family": 0.15, "animation": 0.12, "documentary": 0.20, "scifi": 0.35,
}
KIDS_TASTE_ALPHA = {
    "action": 0.25, "comedy": 0.60, "drama": 0.05, "romance": 0.02, "thriller": 0.02,
    "horror": 0.01, "family": 1.60, "animation": 3.00, "documentary": 0.08, "scifi": 0.15,
}

# country -> (weight, UTC offset in minutes, languages with weights)
COUNTRIES: dict[str, tuple[float, int, tuple[tuple[str, float], ...]]] = {
    "US": (0.34, -300, (("en-US", 0.85), ("es-US", 0.15))),
    "GB": (0.08, 0, (("en-GB", 1.0),)),
    "CA": (0.05, -300, (("en-CA", 0.8), ("fr-CA", 0.2))),
    "BR": (0.10, -180, (("pt-BR", 1.0),)),
    "MX": (0.07, -360, (("es-MX", 1.0),)),
    "DE": (0.07, 60, (("de-DE", 1.0),)),
    "FR": (0.06, 60, (("fr-FR", 1.0),)),
    "ES": (0.05, 60, (("es-ES", 1.0),)),
    "IN": (0.07, 330, (("hi-IN", 0.6), ("en-IN", 0.4))),
    "JP": (0.05, 540, (("ja-JP", 1.0),)),
    "KR": (0.03, 540, (("ko-KR", 1.0),)),
    "AU": (0.03, 600, (("en-AU", 1.0),)),
}

FIRST_NAMES = (
    "ada", "ben", "cora", "dev", "elena", "felix", "greta", "hugo", "iris", "jonah",
    "kira", "liam", "maya", "nico", "olive", "paolo", "quinn", "rosa", "sami", "tess",
    "ugo", "vera", "wade", "xena", "yara", "zane", "amir", "bea", "cyrus", "dina",
    "emil", "fay", "gus", "hana", "ivo", "june", "kai", "lena", "milo", "nina",
)
LAST_NAMES = (
    "abbott", "barros", "chen", "dalton", "eriksen", "fontaine", "garza", "holm", "ivers",
    "jensen", "kovac", "laurent", "moreau", "nakamura", "okafor", "pryce", "quill", "rossi",
    "sato", "thorne", "ueda", "vance", "whitfield", "xu", "yilmaz", "zeller", "alvarez",
    "brandt", "castillo", "delgado", "ellis", "falk", "grant", "hale", "iqbal", "jovic",
    "keane", "lindqvist", "marsh", "novak",
)
TITLE_ADJECTIVES = (
    "Silent", "Last", "Hidden", "Broken", "Golden", "Distant", "Crimson", "Quiet", "Endless",
    "Wild", "Paper", "Midnight", "Burning", "Northern", "Little", "Electric", "Lost", "Secret",
    "Hollow", "Bright", "Frozen", "Restless", "Velvet", "Iron",
)
TITLE_NOUNS = (
    "Harbor", "Orchard", "Signal", "Kingdom", "Summer", "Witness", "Lantern", "Frontier",
    "Garden", "Protocol", "River", "Carnival", "Station", "Echo", "Compass", "Island",
    "Winter", "Machine", "Letter", "Parade", "Horizon", "Ledger", "Meadow", "Circuit",
)


@dataclass(frozen=True)
class NamedArtwork:
    """A hand-written artwork of a named title."""

    suffix: str
    tags: tuple[str, ...]
    is_default: bool = False


@dataclass(frozen=True)
class NamedTitle:
    """A hand-written title (fixed id, genres, cast and artworks)."""

    title_id: str
    name: str
    genres: tuple[str, ...]
    cast: tuple[str, ...]
    rating: str
    runtime: float
    appeal: float
    artworks: tuple[NamedArtwork, ...]


# actor id -> home genre, for every actor of a named title.
NAMED_ACTORS: dict[str, str] = {
    "matt_damon": "drama",
    "minnie_driver": "romance",
    "robin_williams": "comedy",
    "ben_affleck": "drama",
    "uma_thurman": "action",
    "john_travolta": "thriller",
    "samuel_l_jackson": "action",
    "bruce_willis": "action",
    "nell_okafor": "animation",
    "tomas_reyes": "family",
}

NAMED_TITLES: tuple[NamedTitle, ...] = (
    NamedTitle(
        "good_will_hunting", "Good Will Hunting", ("drama", "romance", "comedy"),
        ("matt_damon", "minnie_driver", "robin_williams", "ben_affleck"), "R", 126.0, 0.6,
        (
            NamedArtwork("couple", ("cast:matt_damon", "cast:minnie_driver", "tone:romance", "closeup")),
            NamedArtwork("robin", ("cast:robin_williams", "tone:comedy")),
            NamedArtwork("default", ("cast:matt_damon", "tone:drama"), is_default=True),
            NamedArtwork("friends", ("cast:matt_damon", "cast:ben_affleck", "tone:drama", "group")),
        ),
    ),
    NamedTitle(
        "pulp_fiction", "Pulp Fiction", ("thriller", "drama", "comedy"),
        ("john_travolta", "uma_thurman", "samuel_l_jackson", "bruce_willis"), "R", 154.0, 0.6,
        (
            NamedArtwork("uma", ("cast:uma_thurman", "tone:thriller", "closeup")),
            NamedArtwork("travolta", ("cast:john_travolta", "tone:comedy")),
            NamedArtwork("default", ("cast:john_travolta", "cast:samuel_l_jackson", "tone:thriller", "group"), is_default=True),
            NamedArtwork("jackson", ("cast:samuel_l_jackson", "tone:action", "closeup")),
            NamedArtwork("title", ("tone:drama", "text_heavy")),
        ),
    ),
    NamedTitle(
        "the_lost_kite", "The Lost Kite", ("family", "animation", "drama"),
        ("nell_okafor", "tomas_reyes"), "PG", 94.0, 0.4,
        (
            NamedArtwork("character", ("cast:nell_okafor", "tone:animation", "closeup")),
            NamedArtwork("drama", ("cast:tomas_reyes", "tone:drama")),
            NamedArtwork("default", ("tone:family", "group"), is_default=True),
            NamedArtwork("title", ("tone:family", "text_heavy")),
        ),
    ),
)

# Relative visit/play intensity by local hour (0..23).
HOUR_WEIGHTS_ADULT = (
    2.0, 1.0, 0.5, 0.3, 0.3, 0.3, 0.5, 1.0, 1.5, 1.5, 1.5, 2.0,
    2.5, 2.5, 2.5, 3.0, 3.5, 4.5, 6.0, 7.5, 9.0, 9.0, 7.0, 4.0,
)
HOUR_WEIGHTS_KIDS = (
    0.3, 0.1, 0.1, 0.1, 0.1, 0.3, 1.0, 2.0, 2.0, 2.0, 2.5, 3.0,
    3.5, 4.0, 5.0, 6.5, 8.0, 8.5, 8.0, 7.0, 5.0, 2.5, 1.0, 0.5,
)
DEVICE_SHARE = (0.45, 0.25, 0.15, 0.15)  # tv, mobile, web, tablet: when not the primary device

