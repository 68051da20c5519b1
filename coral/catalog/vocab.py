"""The catalog's vocabulary: classes, attribute values, and small dictionaries for five languages.

Visual attributes (colour, pattern, size, background) are rendered into the image; non-visual ones
(material, brand) appear only in the title. Titles are written in en, id, ms, vi or th.
"""

from coral import schemas as S
from coral.config.catalog import LANGUAGES  # defined in the config layer, which checks catalog.languages

ATTRIBUTE_WORDS = {k: k for k in S.ATTRIBUTE_KEYS}  # the English word an attribute key is named by

# class -> name per language (en, id, ms, vi, th)
CLASSES = {
    "backpack": ("backpack", "tas ransel", "beg galas", "ba lô", "กระเป๋าเป้"),
    "handbag": ("handbag", "tas tangan", "beg tangan", "túi xách", "กระเป๋าถือ"),
    "shoe": ("shoe", "sepatu", "kasut", "giày", "รองเท้า"),
    "hat": ("hat", "topi", "topi", "mũ", "หมวก"),
    "tshirt": ("t-shirt", "kaos", "baju-t", "áo thun", "เสื้อยืด"),
    "mug": ("mug", "cangkir", "mug", "cốc", "แก้วมัค"),
    "bottle": ("bottle", "botol", "botol", "chai", "ขวด"),
    "lamp": ("lamp", "lampu", "lampu", "đèn", "โคมไฟ"),
    "chair": ("chair", "kursi", "kerusi", "ghế", "เก้าอี้"),
    "table": ("table", "meja", "meja", "bàn", "โต๊ะ"),
    "phone": ("phone", "ponsel", "telefon", "điện thoại", "โทรศัพท์"),
    "watch": ("watch", "jam tangan", "jam tangan", "đồng hồ", "นาฬิกา"),
    "umbrella": ("umbrella", "payung", "payung", "ô", "ร่ม"),
    "glasses": ("glasses", "kacamata", "cermin mata", "kính", "แว่นตา"),
}

# colour -> (RGB, names per language)
COLOURS = {
    "red": ((200, 30, 40), ("red", "merah", "merah", "đỏ", "แดง")),
    "green": ((40, 150, 60), ("green", "hijau", "hijau", "xanh lá", "เขียว")),
    "blue": ((40, 70, 200), ("blue", "biru", "biru", "xanh dương", "น้ำเงิน")),
    "yellow": ((235, 200, 30), ("yellow", "kuning", "kuning", "vàng", "เหลือง")),
    "purple": ((130, 50, 160), ("purple", "ungu", "ungu", "tím", "ม่วง")),
    "orange": ((240, 120, 20), ("orange", "oranye", "oren", "cam", "ส้ม")),
    "black": ((25, 25, 25), ("black", "hitam", "hitam", "đen", "ดำ")),
    "pink": ((240, 120, 180), ("pink", "merah muda", "merah jambu", "hồng", "ชมพู")),
}

PATTERNS = {
    "solid": ("solid", "polos", "kosong", "trơn", "สีพื้น"),
    "striped": ("striped", "bergaris", "berjalur", "kẻ sọc", "ลายทาง"),
    "dotted": ("dotted", "berbintik", "berbintik", "chấm bi", "ลายจุด"),
    "checked": ("checked", "kotak-kotak", "petak", "kẻ ô", "ลายตาราง"),
}

# size -> (fraction of the image the object spans, names per language)
SIZES = {
    "small": (0.5, ("small", "kecil", "kecil", "nhỏ", "เล็ก")),
    "medium": (0.72, ("medium", "sedang", "sederhana", "vừa", "กลาง")),
    "large": (0.95, ("large", "besar", "besar", "lớn", "ใหญ่")),
}

BACKGROUNDS = {
    "white": (245, 245, 245),
    "grey": (150, 150, 150),
    "beige": (225, 205, 165),
    "sky": (170, 210, 240),
}

MATERIALS = {
    "leather": ("leather", "kulit", "kulit", "da", "หนัง"),
    "cotton": ("cotton", "katun", "kapas", "cotton", "ผ้าฝ้าย"),
    "plastic": ("plastic", "plastik", "plastik", "nhựa", "พลาสติก"),
    "metal": ("metal", "logam", "logam", "kim loại", "โลหะ"),
    "wood": ("wooden", "kayu", "kayu", "gỗ", "ไม้"),
    "polyester": ("polyester", "poliester", "poliester", "polyester", "โพลีเอสเตอร์"),
}

BRANDS = ("Aurelo", "Brisk", "Cendra", "Dovan", "Elmsto", "Fenwick", "Kova", "Lumio")

ATTRIBUTE_VALUES = {
    "colour": tuple(COLOURS),
    "pattern": tuple(PATTERNS),
    "size": tuple(SIZES),
    "background": tuple(BACKGROUNDS),
    "material": tuple(MATERIALS),
    "brand": BRANDS,
}

# Titles name the class and the attributes an image cannot show.
TITLE_TEMPLATES = {
    "en": "{brand} {material} {cls}",
    "id": "{cls} {material} merek {brand}",
    "ms": "{cls} {material} jenama {brand}",
    "vi": "{cls} {material} thương hiệu {brand}",
    "th": "{cls}{material} ยี่ห้อ {brand}",
}


def title(language: str, cls: str, attributes: dict) -> str:
    i = LANGUAGES.index(language)
    return TITLE_TEMPLATES[language].format(
        cls=CLASSES[cls][i], material=MATERIALS[attributes["material"]][i], brand=attributes["brand"]
    )


def caption(cls: str, attributes: dict) -> str:
    """An English description of what the image shows (visual attributes only)."""
    pattern = "" if attributes["pattern"] == "solid" else f"{attributes['pattern']} "
    return (
        f"a {attributes['size']} {attributes['colour']} {pattern}{CLASSES[cls][0]} "
        f"on a {attributes['background']} background"
    )
