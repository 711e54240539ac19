"""The bundled calibration text of ``--calibrate``: a short, varied English text written for this project.

About 2,500 tokens of SmolLM2's tokenizer (prose, dialogue, minutes, a letter, an explanation, a
match report, instructions, numbers, a little Python and SQL): enough for the per-channel
statistics and the block covariances the int4 search needs (:mod:`flashnorm_onnx.quantize.search`),
and small enough to run through a model in seconds. The second half (from "The committee met on
a Tuesday") was added when the block-covariance clip came in: on SmolLM2 at block 128 symmetric
it lowered held-out ΔNLL by 0.009 [-0.019, +0.000] against the first half alone
(``benchmarks/RESULTS_int4.md``). It is none of the texts the benchmarks evaluate
on (``benchmarks/run_int4.py`` measures perplexity on *Alice's Adventures in Wonderland*).
Written for this project and released with it under its license.
"""

from __future__ import annotations

TEXT = """\
The harbour town woke slowly. Before the first ferry left, the baker on Quay Street had already \
pulled three trays of bread from the oven, and the smell drifted down to the boats where the \
fishermen were untangling their nets. Nobody hurried. The tide would turn at half past seven, and \
everyone knew it, the way people know the shape of their own kitchen in the dark.

Marta had lived there for thirty-one years, long enough to remember when the lighthouse still had \
a keeper. She walked along the sea wall every morning with her dog, a grey mongrel called Pepper, \
and counted the gulls on the railings out of habit rather than interest. Today there were \
fourteen. Yesterday there had been nine.

"You're early," said the harbour master, leaning out of his office window.
"I'm always early," Marta replied. "You're just usually late."
He laughed and held up a mug of coffee, as if it proved something. "The weather service says wind \
from the south-west this afternoon, forty kilometres an hour, gusting sixty. Tell your nephew not \
to take the small boat out."
"I'll tell him. He won't listen, but I'll tell him."

In most European countries, the school year begins in late August or early September and ends in \
June or July. Pupils typically study their own language, mathematics, a foreign language, the \
natural sciences, history, geography, art, music and physical education. In the final years, \
students often specialise, choosing between academic tracks that prepare them for university and \
vocational tracks that combine classroom lessons with practical training in a workplace.

Photosynthesis is the process by which green plants, algae and some bacteria convert light energy \
into chemical energy. Using sunlight, water and carbon dioxide, they produce glucose and release \
oxygen as a by-product. The reactions take place mainly in the chloroplasts, which contain the \
pigment chlorophyll. Chlorophyll absorbs red and blue light strongly and reflects green light, \
which is why leaves appear green to our eyes.

To make a simple tomato soup for four people, you will need: two tablespoons of olive oil, one \
large onion, two cloves of garlic, one kilogram of ripe tomatoes, half a litre of vegetable stock, \
a pinch of sugar, salt and black pepper. Chop the onion and garlic and soften them in the oil over \
a low heat for about ten minutes. Add the chopped tomatoes, the stock and the sugar, then simmer \
for twenty-five minutes. Blend until smooth, season to taste, and serve with fresh bread.

The committee met on Tuesday, 14 March, at 10:00. Present: the chair, the treasurer, the \
secretary and four members. The treasurer reported that income for the year was 12,480 euros and \
expenses were 11,905 euros, leaving a surplus of 575 euros. The committee agreed to spend part of \
the surplus on new chairs for the hall. The next meeting will be held in May.

def average(values):
    \"\"\"Return the arithmetic mean of a non-empty list of numbers.\"\"\"
    if not values:
        raise ValueError("average() needs at least one value")
    return sum(values) / len(values)

print(average([3, 5, 10]))  # prints 6.0

A good question to ask about any measurement is how much it would change if you measured again. \
If you weigh the same bag of flour five times and get 1002, 998, 1001, 999 and 1000 grams, the \
scale is precise. Whether it is also accurate is a separate question: a scale can give the same \
wrong answer every time. Scientists describe the first property as repeatability and check the \
second by comparing the instrument against a known reference.

The train to the mountains leaves from platform six. It climbs through pine forests and over two \
long bridges before reaching the village, where the snow is often still deep in April. Visitors \
come for the skiing in winter and for the walking in summer, when the meadows are full of \
flowers and the cows wear large bronze bells that can be heard from one side of the valley to the \
other. In the evening, the small restaurants serve cheese, potatoes, dried meat and strong tea.

Dear Sam, thank you for your letter and for the photographs. The garden looks wonderful; I had no \
idea the apple tree would recover so quickly after last winter. We are all well here. The \
children have started their new school and seem to like it, although Leo complains that there is \
too much homework. I hope we can visit you in the summer. With love, Anna.

Why did the computer scientist refuse to go outside? Because the documentation said the weather \
was undefined behaviour. Some jokes are better in writing; this one is better not told at all.

The committee met on a Tuesday, which was unusual, because the room above the library was normally booked for the chess club on Tuesdays. Seven members attended. The chair, Mr. Okafor, opened the meeting at 6:05 p.m. and asked whether anyone had corrections to the minutes of the previous session. Ms. Lindqvist pointed out that the budget for the spring festival had been recorded as 4,500 pounds, when the figure agreed was 5,400. The correction was accepted without objection.

Item two concerned the footpath behind the old mill. Several residents had written to complain that the path flooded after heavy rain, and that the wooden bridge over the stream had become slippery and unsafe. The council's engineer had visited in March and estimated that a new drainage channel would cost about 12,000 pounds, while replacing the bridge with a steel one would add another 8,000. After a long discussion, the committee voted five to two to ask the council for a grant covering the drainage first, and to revisit the bridge in the autumn.

Dear Samir,

Thank you for your letter and for the photographs of the garden. The tomatoes look much healthier than last year; I think moving them to the south wall made all the difference. Here the weather has been strange. We had snow in the first week of April, then three days so warm that people sat outside the cafés in shirtsleeves, and now it has rained without stopping since Sunday. The river is higher than I have seen it in a decade.

I have finally finished reading the book you sent me. I enjoyed the first half enormously, especially the chapters set in the observatory, but I found the ending rushed, as if the author had grown tired of her own characters. Still, I would read anything else she wrote. Do you know whether there is a sequel?

Write soon, and give my regards to your mother.

With love,
Helen

How a refrigerator works. A refrigerator does not create cold; it moves heat from the inside of the cabinet to the room outside. A fluid called a refrigerant circulates through a closed loop of pipes. In the evaporator, inside the cabinet, the refrigerant is at low pressure and boils at a low temperature, absorbing heat from the food and the air around it. A compressor then squeezes the vapour, raising its pressure and temperature. In the condenser, the coils at the back of the appliance, the hot vapour releases its heat into the kitchen and turns back into a liquid. Finally, the liquid passes through an expansion valve, its pressure drops, and the cycle begins again. This is why the back of a refrigerator feels warm, and why it works less efficiently when it is pushed tight against a wall.

The match was decided in the last ten minutes. For most of the second half the visitors had defended deep, content with a draw, and the home side had run out of ideas. Then, in the 83rd minute, a long ball from the goalkeeper bounced awkwardly in front of the centre-back, the young striker nipped in, and his shot from the edge of the area curled into the top corner. The stadium erupted. Four minutes later a header from a corner made it 2-0, and the visiting supporters began to leave.

"Can I ask you something?" said the girl at the ticket window.
"Of course."
"Why does the train to the coast always leave from platform nine, even when platform two is empty?"
The station master thought about it for a while. "Because the line to the coast starts on the far side of the bridge," he said, "and only platform nine is connected to it. If the train left from platform two, it would have to cross every other track to get there."
"So it's about the tracks, not the platforms."
"It is almost always about the tracks."

Temperature readings, weekly average (degrees Celsius):
Week 1: 4.2, week 2: 5.8, week 3: 7.1, week 4: 6.4, week 5: 9.9, week 6: 11.3.
Rainfall over the same period was 18, 42, 7, 31, 12 and 25 millimetres respectively.

class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, count=1):
        self.items[name] = self.items.get(name, 0) + count

    def remove(self, name, count=1):
        if self.items.get(name, 0) < count:
            raise ValueError(f"not enough {name} in stock")
        self.items[name] -= count

    def total(self):
        return sum(self.items.values())

SELECT customer_id, COUNT(*) AS orders, SUM(amount) AS spent
FROM orders
WHERE created_at >= '2024-01-01'
GROUP BY customer_id
HAVING COUNT(*) > 3
ORDER BY spent DESC;

In the eighteenth century, most of the world's cotton was spun by hand. Within a few decades, a series of inventions changed that completely: the flying shuttle, the spinning jenny, the water frame, and finally the steam engine, which freed mills from the need to stand beside fast rivers. Towns that had been villages grew into cities, and cities into industrial centres, drawing workers from the countryside with the promise of regular wages. The conditions they found were often harsh. Children worked twelve-hour shifts; accidents were common; and the air in the spinning rooms was thick with dust. Reform came slowly, through factory acts that limited working hours, set a minimum age, and eventually required inspectors to enforce the rules.

To make a simple vinaigrette, combine three tablespoons of olive oil with one tablespoon of red wine vinegar, a teaspoon of mustard, a pinch of salt and some freshly ground pepper. Shake everything together in a small jar with the lid on until it thickens. Taste it on a leaf of lettuce rather than from a spoon, and adjust: a little more vinegar if it is flat, a drop of honey if it is too sharp.

Questions and answers. Q: What is the difference between weather and climate? A: Weather is what happens in the atmosphere over hours or days; climate is the pattern of weather over thirty years or more. Q: Why is the sky blue? A: Sunlight is scattered by the molecules of the air, and shorter, bluer wavelengths are scattered much more strongly than longer, redder ones. Q: How far away is the Moon? A: On average about 384,400 kilometres, though the distance varies by roughly ten percent over each orbit.
"""
