"""The person figure of a synthetic image: limbs, torso, head, hair, hat and bags."""

from __future__ import annotations

import math
import random

from PIL import ImageDraw

from datasets.synthetic.attributes import PersonAttributes
from datasets.synthetic.drawing import RGB, _along, _capsule, _mix, _outline, _scale


class _FigurePainter:
    """Draws one person on a canvas; all lengths are fractions of the figure height P."""

    def __init__(
        self,
        draw: ImageDraw.ImageDraw,
        attrs: PersonAttributes,
        colours: dict[str, RGB],
        rng: random.Random,
        person_h: float,
        top: float,
        cx: float,
        facing: str,
    ) -> None:
        self.draw = draw
        self.a = attrs
        self.c = colours
        self.rng = rng
        self.P = person_h
        self.top = top
        self.cx = cx
        self.facing = facing
        self.side = facing in ("left", "right")
        self.d = 1.0 if facing == "right" else -1.0 if facing == "left" else 0.0
        female = attrs.gender == "female"
        build = {"slim": 0.88, "average": 1.0, "broad": 1.14}[attrs.build]
        self.sw = (0.108 if female else 0.126) * build * person_h  # shoulder half width
        self.ww = (0.080 if female else 0.100) * build * person_h  # waist
        self.hw = (0.108 if female else 0.098) * build * person_h  # hips
        self.arm_t = 0.052 * build * person_h
        self.leg_t = 0.072 * build * person_h
        self.head_r = 0.064 * person_h
        self.head_c = (cx + self.d * 0.012 * person_h, self.y(0.072))
        self.depth = 0.62 if self.side else 1.0

    def y(self, f: float) -> float:
        return self.top + f * self.P

    def L(self, f: float) -> float:
        return f * self.P

    # ---- limbs -----------------------------------------------------------
    def _legs(self) -> list[tuple[tuple[float, float], tuple[float, float], tuple[float, float], float]]:
        """(hip, knee, ankle, shade) per leg, back leg first."""
        rng = self.rng
        hip_y, thigh, shin = self.y(0.50), self.L(0.22), self.L(0.235)
        legs = []
        if not self.side:
            spread = self.L(rng.uniform(-0.004, 0.03))
            for s in (-1.0, 1.0):
                hip = (self.cx + s * self.hw * 0.5, hip_y)
                knee = (hip[0] + s * spread * 0.5, hip_y + thigh)
                ankle = (hip[0] + s * spread, hip_y + thigh + shin)
                legs.append((hip, knee, ankle, 1.0))
            return legs
        stride = math.radians(rng.uniform(3.0, 24.0))
        for lead, shade in ((-1.0, 0.82), (1.0, 1.0)):
            th = lead * stride
            sh = th * (0.5 if lead > 0 else 1.45)
            hip = (self.cx, hip_y)
            knee = (hip[0] + self.d * math.sin(th) * thigh, hip_y + math.cos(th) * thigh)
            ankle = (knee[0] + self.d * math.sin(sh) * shin, knee[1] + math.cos(sh) * shin)
            legs.append((hip, knee, ankle, shade))
        return legs

    def _arms(self) -> list[tuple[tuple[float, float], tuple[float, float], tuple[float, float], float, bool]]:
        """(shoulder, elbow, hand, shade, in_front) per arm."""
        rng = self.rng
        upper, fore = self.L(0.17), self.L(0.16)
        arms = []
        if not self.side:
            for s in (-1.0, 1.0):
                sh = (self.cx + s * (self.sw - self.arm_t * 0.45), self.y(0.175))
                out = math.radians(rng.uniform(3.0, 12.0))
                bend = out + math.radians(rng.uniform(-6.0, 8.0))
                el = (sh[0] + s * math.sin(out) * upper, sh[1] + math.cos(out) * upper)
                hand = (el[0] + s * math.sin(bend) * fore, el[1] + math.cos(bend) * fore)
                arms.append((sh, el, hand, 1.0, True))
            return arms
        swing = math.radians(rng.uniform(0.0, 24.0))
        for lead, shade, front in ((1.0, 0.82, False), (-1.0, 1.0, True)):
            a = lead * swing
            b = a + math.radians(rng.uniform(5.0, 25.0))
            sh = (self.cx, self.y(0.175))
            el = (sh[0] + self.d * math.sin(a) * upper, sh[1] + math.cos(a) * upper)
            hand = (el[0] + self.d * math.sin(b) * fore, el[1] + math.cos(b) * fore)
            arms.append((sh, el, hand, shade, front))
        return arms

    def draw_leg(
        self, hip: tuple[float, float], knee: tuple[float, float], ankle: tuple[float, float], shade: float
    ) -> None:
        a, c, dr = self.a, self.c, self.draw
        skin = _scale(c["skin"], shade)
        bottom = _scale(c["bottom"], shade)
        kind = a.bottom_type
        if kind in ("trousers", "jeans"):
            t = self.leg_t * (1.12 if kind == "trousers" else 1.0)
            edge = _outline(bottom)
            for p, q in ((hip, knee), (knee, ankle)):
                _capsule(dr, p, q, t + 2, edge)
            for p, q in ((hip, knee), (knee, ankle)):
                _capsule(dr, p, q, t, bottom)
            if kind == "jeans":
                # faded knees, rolled cuffs and a light seam: what tells jeans apart
                fade = _mix(bottom, (235, 235, 235), 0.28)
                _capsule(dr, _along(hip, knee, 0.7), _along(knee, ankle, 0.15), t * 0.55, fade)
                _capsule(dr, _along(knee, ankle, 0.9), ankle, t * 1.08, fade)
        else:
            t = self.leg_t * 0.86
            _capsule(dr, hip, knee, t, skin)
            _capsule(dr, knee, ankle, t, skin)
            if kind == "shorts":
                end = _along(hip, knee, 0.62)
                _capsule(dr, hip, end, self.leg_t * 1.32 + 2, _outline(bottom))
                _capsule(dr, hip, end, self.leg_t * 1.32, bottom)
        # shoe
        x, y = ankle
        # Shoes are drawn a little oversized so their colour survives a 64x32 resize.
        if self.side:
            fx = x + self.d * self.L(0.028)
            box = (fx - self.L(0.066), y - self.L(0.016), fx + self.L(0.066), y + self.L(0.045))
        else:
            box = (x - self.L(0.052), y - self.L(0.016), x + self.L(0.052), y + self.L(0.045))
        shoes = _scale(c["shoes"], shade)
        dr.ellipse(box, fill=shoes, outline=_outline(shoes), width=1)

    def draw_hips(self) -> None:
        """Garment across the hips (crotch of trousers/shorts, skirt)."""
        a, dr = self.a, self.draw
        colour = self.c["bottom"]
        hw = self.hw * self.depth
        if a.bottom_type in ("trousers", "jeans", "shorts"):
            dr.polygon(
                [
                    (self.cx - hw, self.y(0.48)),
                    (self.cx + hw, self.y(0.48)),
                    (self.cx + hw * 0.85, self.y(0.585)),
                    (self.cx - hw * 0.85, self.y(0.585)),
                ],
                fill=colour,
            )
        elif a.bottom_type == "skirt":
            flare = 1.6 if not self.side else 1.25
            pts = [
                (self.cx - hw * 1.02, self.y(0.47)),
                (self.cx + hw * 1.02, self.y(0.47)),
                (self.cx + hw * flare, self.y(0.69)),
                (self.cx - hw * flare, self.y(0.69)),
            ]
            dr.polygon(pts, fill=colour, outline=_outline(colour), width=2)

    def draw_arm(
        self, sh: tuple[float, float], el: tuple[float, float], hand: tuple[float, float], shade: float
    ) -> None:
        a, c, dr = self.a, self.c, self.draw
        skin = _scale(c["skin"], shade)
        top = _scale(c["top"], shade)
        t = self.arm_t
        if a.top_type in ("long-sleeve", "jacket", "coat"):
            edge = _outline(top)
            _capsule(dr, sh, el, t * 1.12 + 2, edge)
            _capsule(dr, el, hand, t * 1.05 + 2, edge)
            _capsule(dr, sh, el, t * 1.12, top)
            _capsule(dr, el, hand, t * 1.05, top)
        else:
            _capsule(dr, sh, el, t * 0.9, skin)
            _capsule(dr, el, hand, t * 0.85, skin)
            if a.top_type == "t-shirt":
                _capsule(dr, sh, _along(sh, el, 0.55), t * 1.3, top)
        r = t * 0.55
        dr.ellipse((hand[0] - r, hand[1] - r, hand[0] + r, hand[1] + r), fill=skin)

    # ---- torso -----------------------------------------------------------
    def draw_torso(self) -> None:
        self._draw_bare_torso()
        hem_y = self._draw_top()
        self._draw_top_details(hem_y)

    def _draw_bare_torso(self) -> None:
        """Neck and the skin a sleeveless garment leaves bare (front shoulder caps included)."""
        dr = self.draw
        cx, k = self.cx, self.depth
        sw, ww, hw = self.sw * k, self.ww * k, self.hw * k
        y_sh = self.y(0.158)
        skin = self.c["skin"]
        # neck + bare shoulders under sleeveless garments
        dr.rectangle((cx - self.L(0.026), self.y(0.12), cx + self.L(0.026), y_sh + self.L(0.02)), fill=skin)
        bare = [
            (cx - sw, y_sh + self.L(0.012)),
            (cx + sw, y_sh + self.L(0.012)),
            (cx + ww, self.y(0.36)),
            (cx + hw, self.y(0.5)),
            (cx - hw, self.y(0.5)),
            (cx - ww, self.y(0.36)),
        ]
        dr.polygon(bare, fill=skin)
        # Seen from the side the arms hang from the body's centre line, so no
        # shoulder caps stick out of the silhouette.
        for s in () if self.side else (-1.0, 1.0):
            x = cx + s * (sw - self.arm_t * 0.45)
            r = self.arm_t * 0.62
            dr.ellipse((x - r, self.y(0.175) - r, x + r, self.y(0.175) + r), fill=skin)

    def _draw_top(self) -> float:
        """The top's silhouette (and, from the front, its sleeve caps); returns the hem's height fraction."""
        dr = self.draw
        cx, k = self.cx, self.depth
        sw, ww, hw = self.sw * k, self.ww * k, self.hw * k
        y_sh = self.y(0.158)
        top = self.c["top"]
        kind = self.a.top_type
        hem_y, hem_w = {
            "t-shirt": (0.53, 1.02),
            "long-sleeve": (0.53, 1.02),
            "vest": (0.52, 1.0),
            "jacket": (0.565, 1.12),
            "coat": (0.775, 1.32),
            "dress": (0.76, 1.62),
        }[kind]
        if self.side:
            hem_w = 1.0 + (hem_w - 1.0) * 0.6
        if kind in ("vest", "dress") and not self.side:
            strap = sw * 0.52
            pts = [
                (cx - strap, y_sh),
                (cx + strap, y_sh),
                (cx + sw * 0.86, self.y(0.245)),
                (cx + ww, self.y(0.37)),
                (cx + hw * hem_w, self.y(hem_y)),
                (cx - hw * hem_w, self.y(hem_y)),
                (cx - ww, self.y(0.37)),
                (cx - sw * 0.86, self.y(0.245)),
            ]
        else:
            pts = [
                (cx - sw, y_sh),
                (cx + sw, y_sh),
                (cx + ww * 1.04, self.y(0.37)),
                (cx + hw * hem_w, self.y(hem_y)),
                (cx - hw * hem_w, self.y(hem_y)),
                (cx - ww * 1.04, self.y(0.37)),
            ]
        dr.polygon(pts, fill=top, outline=_outline(top), width=2)
        if kind not in ("vest", "dress") and not self.side:
            for s in (-1.0, 1.0):
                x = cx + s * (sw - self.arm_t * 0.45)
                r = self.arm_t * 0.58
                dr.ellipse((x - r, self.y(0.178) - r, x + r, self.y(0.178) + r), fill=top)
        return hem_y

    def _draw_top_details(self, hem_y: float) -> None:
        """Back seam, side opening, or neckline / open front / buttons, as the facing shows them."""
        c, dr = self.c, self.draw
        cx, hw = self.cx, self.hw * self.depth
        sw = self.sw * self.depth
        y_sh = self.y(0.158)
        skin, top = c["skin"], c["top"]
        kind = self.a.top_type
        if self.facing == "back":
            if kind == "coat":
                dr.line([(cx, self.y(0.5)), (cx, self.y(hem_y))], fill=_outline(top), width=2)
            return
        if self.side:
            if kind in ("jacket", "coat"):
                x = cx + self.d * sw * 0.85
                dr.line([(x, y_sh + self.L(0.03)), (x, self.y(hem_y))], fill=_outline(top), width=2)
            return
        if kind in ("t-shirt", "long-sleeve"):
            r = self.L(0.03)
            dr.pieslice((cx - r, y_sh - r, cx + r, y_sh + r), 0, 180, fill=skin)
        elif kind in ("jacket", "coat"):
            v = self.L(0.05)
            dr.polygon([(cx - v, y_sh), (cx + v, y_sh), (cx, self.y(0.29))], fill=c["inner"])
            dr.line([(cx, self.y(0.29)), (cx, self.y(hem_y))], fill=_outline(top), width=2)
            if kind == "coat":
                r = max(1.0, self.L(0.008))
                for f in (0.34, 0.42, 0.5):
                    bx = cx - self.L(0.018)
                    dr.ellipse((bx - r, self.y(f) - r, bx + r, self.y(f) + r), fill=_outline(top))
                dr.line([(cx - hw * 0.9, self.y(0.44)), (cx + hw * 0.9, self.y(0.44))], fill=_outline(top), width=2)

    # ---- head ------------------------------------------------------------
    def draw_hair_behind(self) -> None:
        a, dr = self.a, self.draw
        if a.hair_style == "bald":
            return
        hx, hy = self.head_c
        r = self.head_r
        hair = self.c["hair"]
        if a.hair_style == "long" and self.facing == "front":
            dr.rounded_rectangle((hx - 1.2 * r, hy - 0.9 * r, hx + 1.2 * r, self.y(0.25)), radius=r * 0.6, fill=hair)
        elif a.hair_style == "ponytail" and self.facing == "front":
            s = self.rng.choice((-1.0, 1.0))
            dr.ellipse(
                (hx + s * 0.75 * r - 0.4 * r, hy - 0.2 * r, hx + s * 0.75 * r + 0.55 * r, hy + 1.5 * r), fill=hair
            )

    def draw_head(self) -> None:
        hx, hy = self.head_c
        r = self.head_r
        skin = self.c["skin"]
        self.draw.ellipse((hx - r, hy - r * 1.08, hx + r, hy + r), fill=skin, outline=_scale(skin, 0.8), width=1)
        if self.facing == "back":
            self._draw_hair_from_back()
        elif self.side:
            self._draw_head_from_side()
        else:
            self._draw_head_from_front()
        self._draw_hat()

    def _draw_hair_from_back(self) -> None:
        """Hair seen from behind (the face is hidden)."""
        dr = self.draw
        hx, hy = self.head_c
        r = self.head_r
        hair = self.c["hair"]
        style = self.a.hair_style
        if style != "bald":
            dr.ellipse((hx - r * 1.06, hy - r * 1.14, hx + r * 1.06, hy + r * 1.02), fill=hair)
            if style == "long":
                dr.rounded_rectangle(
                    (hx - 1.22 * r, hy - 0.2 * r, hx + 1.22 * r, self.y(0.27)), radius=r * 0.6, fill=hair
                )
            elif style == "ponytail":
                dr.ellipse((hx - 0.42 * r, hy + 0.4 * r, hx + 0.42 * r, hy + 2.1 * r), fill=hair)

    def _draw_head_from_side(self) -> None:
        """Hair in profile and the one visible eye."""
        dr = self.draw
        hx, hy = self.head_c
        r = self.head_r
        hair = self.c["hair"]
        style = self.a.hair_style
        d = self.d
        if style != "bald":
            box = (hx - r * 1.07, hy - r * 1.16, hx + r * 1.07, hy + r * 1.02)
            start, end = (150.0, 345.0) if style == "short" else (105.0, 350.0)
            if d < 0:
                start, end = 180.0 - end, 180.0 - start
            dr.pieslice(box, start, end, fill=hair)
            if style == "long":
                dr.rounded_rectangle(
                    (
                        min(hx - d * 1.12 * r, hx - d * 0.1 * r),
                        hy - 0.3 * r,
                        max(hx - d * 1.12 * r, hx - d * 0.1 * r),
                        self.y(0.26),
                    ),
                    radius=r * 0.5,
                    fill=hair,
                )
            elif style == "ponytail":
                tx = hx - d * 1.25 * r
                dr.polygon(
                    [
                        (hx - d * 0.8 * r, hy - 0.4 * r),
                        (tx - d * 0.35 * r, hy + 0.2 * r),
                        (tx, hy + 1.6 * r),
                        (hx - d * 0.7 * r, hy + 0.3 * r),
                    ],
                    fill=hair,
                )
        er = max(1.0, self.L(0.008))
        ex = hx + d * 0.55 * r
        dr.ellipse((ex - er, hy - er, ex + er, hy + er), fill=(40, 30, 30))

    def _draw_head_from_front(self) -> None:
        """Both eyes, then the hair framing the face."""
        dr = self.draw
        hx, hy = self.head_c
        r = self.head_r
        hair = self.c["hair"]
        style = self.a.hair_style
        er = max(1.0, self.L(0.008))
        for s in (-1.0, 1.0):
            ex = hx + s * 0.36 * r
            dr.ellipse((ex - er, hy - er, ex + er, hy + er), fill=(40, 30, 30))
        if style != "bald":
            dr.pieslice((hx - r * 1.08, hy - r * 1.16, hx + r * 1.08, hy + r * 0.7), 180, 360, fill=hair)
            if style == "long":
                for s in (-1.0, 1.0):
                    x0, x1 = sorted((hx + s * 0.72 * r, hx + s * 1.22 * r))
                    dr.rounded_rectangle((x0, hy - 0.45 * r, x1, self.y(0.235)), radius=r * 0.25, fill=hair)
            else:
                for s in (-1.0, 1.0):
                    x0, x1 = sorted((hx + s * 0.78 * r, hx + s * 1.06 * r))
                    dr.rectangle((x0, hy - 0.45 * r, x1, hy + 0.15 * r), fill=hair)

    def _draw_hat(self) -> None:
        a, dr = self.a, self.draw
        if a.hat is None:
            return
        hx, hy = self.head_c
        r = self.head_r
        col = self.c["hat"]
        edge = _outline(col)
        if a.hat == "cap":
            dr.pieslice(
                (hx - r * 1.1, hy - r * 1.24, hx + r * 1.1, hy + r * 0.72), 180, 360, fill=col, outline=edge, width=1
            )
            if self.side:
                x0, x1 = sorted((hx + self.d * 0.4 * r, hx + self.d * 1.75 * r))
                dr.rectangle((x0, hy - 0.3 * r, x1, hy - 0.08 * r), fill=col, outline=edge, width=1)
            elif self.facing == "front":
                dr.ellipse(
                    (hx - 1.18 * r, hy - 0.42 * r, hx + 1.18 * r, hy - 0.02 * r), fill=col, outline=edge, width=1
                )
        else:
            dr.pieslice(
                (hx - r * 1.13, hy - r * 1.42, hx + r * 1.13, hy + r * 0.9), 180, 360, fill=col, outline=edge, width=1
            )
            dr.rectangle(
                (hx - 1.13 * r, hy - 0.42 * r, hx + 1.13 * r, hy - 0.08 * r),
                fill=_scale(col, 0.85),
                outline=edge,
                width=1,
            )

    # ---- bags ------------------------------------------------------------
    def draw_backpack_behind(self) -> None:
        if self.a.bag != "backpack" or self.facing != "front":
            return
        col = self.c["bag"]
        sw = self.sw
        self.draw.rounded_rectangle(
            (self.cx - sw * 1.1, self.y(0.15), self.cx + sw * 1.1, self.y(0.44)),
            radius=self.L(0.03),
            fill=col,
            outline=_outline(col),
            width=2,
        )

    def draw_bags_front(self, hand_front: tuple[float, float], hand_side: float) -> None:
        if self.a.bag is None:
            return
        if self.a.bag == "backpack":
            self._draw_backpack_front()
        elif self.a.bag == "handbag":
            self._draw_handbag(hand_front)
        else:
            self._draw_shoulder_bag(hand_side)

    def _draw_backpack_front(self) -> None:
        """The backpack seen from behind or the side, or its straps from the front."""
        dr = self.draw
        col = self.c["bag"]
        edge = _outline(col)
        cx, y = self.cx, self.y
        strap_w = max(2, int(round(self.L(0.03))))
        if self.facing == "back":
            dr.rounded_rectangle(
                (cx - self.L(0.13), y(0.185), cx + self.L(0.13), y(0.47)),
                radius=self.L(0.03),
                fill=col,
                outline=edge,
                width=2,
            )
            dr.rounded_rectangle(
                (cx - self.L(0.09), y(0.34), cx + self.L(0.09), y(0.45)),
                radius=self.L(0.02),
                fill=_scale(col, 0.85),
                outline=edge,
                width=1,
            )
        elif self.side:
            back = self.sw * self.depth
            x0, x1 = sorted((cx - self.d * (back + self.L(0.11)), cx - self.d * (back - self.L(0.02))))
            dr.rounded_rectangle((x0, y(0.18), x1, y(0.45)), radius=self.L(0.03), fill=col, outline=edge, width=2)
            dr.line([(cx, y(0.165)), (cx + self.d * back * 0.8, y(0.36))], fill=col, width=strap_w)
        else:
            for s in (-1.0, 1.0):
                dr.line(
                    [(cx + s * self.sw * 0.55, y(0.158)), (cx + s * self.sw * 0.62, y(0.40))],
                    fill=col,
                    width=strap_w,
                )

    def _draw_handbag(self, hand_front: tuple[float, float]) -> None:
        """A handbag hanging from the hand at ``hand_front``."""
        dr = self.draw
        col = self.c["bag"]
        edge = _outline(col)
        hx, hy = hand_front
        w, h = self.L(0.06), self.L(0.10)
        dr.arc((hx - w * 0.55, hy - self.L(0.02), hx + w * 0.55, hy + self.L(0.05)), 180, 360, fill=edge, width=2)
        dr.polygon(
            [
                (hx - w * 0.8, hy + self.L(0.02)),
                (hx + w * 0.8, hy + self.L(0.02)),
                (hx + w, hy + h),
                (hx - w, hy + h),
            ],
            fill=col,
            outline=edge,
            width=2,
        )

    def _draw_shoulder_bag(self, hand_side: float) -> None:
        """A shoulder bag across the body; ``hand_side`` (-1 or 1) picks the shoulder of its strap (front, back)."""
        dr = self.draw
        col = self.c["bag"]
        edge = _outline(col)
        cx, y = self.cx, self.y
        strap_w = max(2, int(round(self.L(0.03))))
        s = hand_side
        if self.side:
            start = (cx - self.d * self.sw * 0.3, y(0.165))
            bx = cx + self.d * self.sw * 0.55
        else:
            start = (cx + s * self.sw * 0.7, y(0.165))
            bx = cx - s * (self.hw + self.L(0.035))
        dr.line([start, (bx, y(0.46))], fill=col, width=strap_w)
        w = self.L(0.062)
        dr.rounded_rectangle(
            (bx - w, y(0.44), bx + w, y(0.55)), radius=self.L(0.012), fill=col, outline=edge, width=2
        )
        dr.line([(bx - w, y(0.475)), (bx + w, y(0.475))], fill=edge, width=1)

    # ---- whole figure ------------------------------------------------------
    def paint(self) -> None:
        legs = self._legs()
        arms = self._arms()
        self.draw_hair_behind()
        self.draw_backpack_behind()
        for arm in arms:
            if not arm[4]:
                self.draw_arm(arm[0], arm[1], arm[2], arm[3])
        for hip, knee, ankle, shade in legs:
            self.draw_leg(hip, knee, ankle, shade)
        self.draw_hips()
        self.draw_torso()
        front_arms = [arm for arm in arms if arm[4]]
        if self.side:
            # the far-side bag strap / backpack belong behind the near arm
            self.draw_head()
            hand_arm = front_arms[0]
            if self.a.bag != "handbag":
                self.draw_bags_front(hand_arm[2], 1.0)
            self.draw_arm(hand_arm[0], hand_arm[1], hand_arm[2], hand_arm[3])
            if self.a.bag == "handbag":
                self.draw_bags_front(hand_arm[2], 1.0)
            return
        for arm in front_arms:
            self.draw_arm(arm[0], arm[1], arm[2], arm[3])
        self.draw_head()
        side = self.rng.choice((0, 1))
        hand = front_arms[side][2]
        self.draw_bags_front(hand, -1.0 if side == 0 else 1.0)
