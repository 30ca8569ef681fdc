"""Contract of the synthetic data generator: the bytes it writes per seed are pinned.

Every file :func:`datasets.synthetic.generate` writes for two small configurations
(JPEG and PNG, benchmark and WebPerson noise, one and two workers), the in-memory
generic pretraining corpus and a contact sheet are hashed and compared with literal
SHA-256 digests recorded from the generator before it was split into a package. A
refactor that changes one byte of an image, caption, noise record, shard or side file
fails here.

The digests pin the installed encoders too (Pillow's JPEG/PNG/zlib, numpy's random
normal): after an upgrade of those, or a deliberate change to the generator (then
also bump ``GENERATOR_VERSION``), rerun this test and copy the digests from the failure
message.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest

from datasets.synthetic import (
    SyntheticConfig,
    contact_sheet,
    generate,
    generic_corpus,
    render_person,
    sample_identities,
)

#: Name -> (generate() keyword arguments, workers). Small: the whole file runs in seconds.
#: "wrong_attr_seed4" corrupts every caption with a wrong attribute (types, bags, hats, not
#: only colours) and is written over an earlier corpus of another seed (``overwrite=True``).
CONFIGS: dict[str, tuple[dict[str, Any], int]] = {
    "jpg_seed0": (
        dict(identities=4, images_per_id=2, val_ids=2, test_ids=2, webperson_images=6, shard_size=4,
             noise_rate=0.5, benchmark_noise_rate=0.5, seed=0),
        1,
    ),
    "png_seed7": (
        dict(identities=3, images_per_id=3, val_ids=1, test_ids=2, webperson_images=9, shard_size=2,
             noise_rate=1.0, benchmark_noise_rate=0.0, wrong_attr_rate=0.3, irrelevant_rate=0.7,
             image_size=(64, 32), image_format="png", seed=7),
        2,
    ),
    "wrong_attr_seed4": (
        dict(identities=2, images_per_id=1, val_ids=0, test_ids=1, webperson_images=40, shard_size=16,
             noise_rate=1.0, benchmark_noise_rate=1.0, irrelevant_rate=0.0, image_size=(32, 16),
             image_format="png", seed=4),
        1,
    ),
}
#: Configurations written over an earlier corpus: the folder first gets these settings.
OVERWRITTEN: dict[str, dict[str, Any]] = {
    "wrong_attr_seed4": dict(identities=3, images_per_id=2, val_ids=1, test_ids=1, webperson_images=50,
                             image_size=(32, 16), seed=5),
}

EXPECTED_FILES: dict[str, dict[str, str]] = {
    "jpg_seed0": {
        ".gadms-synthetic": "4e7d7d20933ff4f9e260e7a1fd21f63079e231eeba9e9cadf425d3f369ebfc0b",
        "CUHK-PEDES/imgs/test/00007_00.jpg": "bf2fab2a5970db6fcf9a7f982df5583e989c9747d3293c31884af8634bb7088e",
        "CUHK-PEDES/imgs/test/00007_01.jpg": "635d61593743706065a5b590a8ba3a9b4c256bc6ee1913f28afc931e43b3efe1",
        "CUHK-PEDES/imgs/test/00008_00.jpg": "26966179365e3c8677847e045664e237d3171c136424692eb7eca16b03b21ecf",
        "CUHK-PEDES/imgs/test/00008_01.jpg": "f9da4d3d48c61cbc31e60ad70705e60088df84855408260701a7efb7172f59a7",
        "CUHK-PEDES/imgs/train/00001_00.jpg": "5ffeaaa71126ce1ab65d2ad8ce59eb0ade65c6ca4fc2a24a6a484386cad0af7a",
        "CUHK-PEDES/imgs/train/00001_01.jpg": "fc634e4f0424b7afa7b87f6174457d7561a4250f2da38ee8979e3bd5e798e284",
        "CUHK-PEDES/imgs/train/00002_00.jpg": "6459a3b80fe8fb4c4f24bdf484632a8531382292be5a40b2aa8c28cb29f65c70",
        "CUHK-PEDES/imgs/train/00002_01.jpg": "77c9cf3008cae4972640e0a13bd973ac118acde6ae143eaf686d1329c36b9529",
        "CUHK-PEDES/imgs/train/00003_00.jpg": "b4b25a5665772d247b49109f48bf050da7ae50e10a74cbf3a1e5bdd4dd18b089",
        "CUHK-PEDES/imgs/train/00003_01.jpg": "d316059c5a8bcc06ca12e1790f87c95c6c5bf6f49c945dd4c469892e12006d49",
        "CUHK-PEDES/imgs/train/00004_00.jpg": "e36449d170673d3c3dba5561bc93e94085e86205503d85a3a95915722bedac1f",
        "CUHK-PEDES/imgs/train/00004_01.jpg": "98b4f8fe51412eba1bf3ba3d6a489c604e5f704b4eb412d156b0c6b84901e7bb",
        "CUHK-PEDES/imgs/val/00005_00.jpg": "5ad2103fdd74018ed34baed2fe573370e87477944fbb20531e78933044e3098e",
        "CUHK-PEDES/imgs/val/00005_01.jpg": "47c03bf71afd0d6124d59970a2743bbcf6d8f11083735d6cf611248bb67c5ae8",
        "CUHK-PEDES/imgs/val/00006_00.jpg": "33b3c41c53d70aa354a44662916d5113f1ab951ff9d62384e3a199b7ed0944fd",
        "CUHK-PEDES/imgs/val/00006_01.jpg": "b4cf7d793ffd0a886915e56a091a1852ec17dbef34a93140243426e145f5c83e",
        "CUHK-PEDES/reid_raw.json": "864d7a009149f885b9f1c7b2aad38e5c9f9cdbf49705b0e1600ef209efced39d",
        "README.txt": "b46158e9f3db7a67a841080977f6d1fd0912890deb3c1dccca2a1997ea685882",
        "WebPerson/annotations.json": "43f8955cd561f51abfbb769519447ae2522d46c037bfb8e70f1772ddc57f2fff",
        "WebPerson/annotations.jsonl": "4aee5fe849888bc73e6b24d85935df7e780064c7027b5056c982959940030677",
        "WebPerson/images/0000/00000000.jpg": "e2a6cc67c9ac9c6daa18b5720f2ab0cd0af3b02b63e01f825561380ebc33d3fe",
        "WebPerson/images/0000/00000001.jpg": "73e639eb85fadbe217b0f0acbf1dbe43c96952b44f3d1e9aee7a598d722c9075",
        "WebPerson/images/0000/00000002.jpg": "5b3a471d195ea09f82a3b3ae8c00818a7a7393be97fe92e09021c73d8c8593cb",
        "WebPerson/images/0000/00000003.jpg": "29f9c3da1291d0b7d916f5e1013ce35e4d25c091894f027a718b98f3c53d93fa",
        "WebPerson/images/0000/00000004.jpg": "c167c66bbc9d4e256563aa19b9be339b201de44b98ecb084053109a8833c8f5e",
        "WebPerson/images/0000/00000005.jpg": "145be15f209667da264bb2d5493594f33788ad665b4000bb24c6810a064d8048",
        "WebPerson/shards/webperson-000000.tar": "824483b9623ea9d4efffc58a85e72cd2ebd61be505124e27d283c837594309a8",
        "WebPerson/shards/webperson-000001.tar": "2f88cb83e18f0434eb6ead6957f458096ba199d12049c9e158836d0e8bb0e082",
        "attributes.json": "88150193d30aaa44b9541508d589f1b5e13301f73e879fd339030f1a087c82d1",
        "meta.json": "a45acdf015e0fd89b3a7e116c4bf3fe1dde824f97458325184dbf36caf6da162",
        "noise_report.json": "87787796cdf2f61e3b62595576d778f71bab5b9cefdfbbdb8e520f7918528c69",
    },
    "png_seed7": {
        ".gadms-synthetic": "cc6c14754362ac160630b066a6a430fb5eb6cd2b6ecd30d6b5aae4e3deb94cb8",
        "CUHK-PEDES/imgs/test/00005_00.png": "27b4fc4448d74e2a5ca52a55494467b9a93a198ed93254c5fbc6be45c1b4e6a1",
        "CUHK-PEDES/imgs/test/00005_01.png": "bc0749926676b312b3e12c510364844b310215bff6e58bb4bf7ae93c0c803d36",
        "CUHK-PEDES/imgs/test/00005_02.png": "e1d49be24e87c7ba87030ed3b6ab8d2921f76efe076bc6b41e8e6b29cc12d1f5",
        "CUHK-PEDES/imgs/test/00006_00.png": "428ac5d76d6f469bf90d70e61d5876991ad5bcfbc7586297ab5ba1f6fac45774",
        "CUHK-PEDES/imgs/test/00006_01.png": "0995e602ea267dc4a40ef33f5da515c7ff3f21568c81a563a848e445192cc643",
        "CUHK-PEDES/imgs/test/00006_02.png": "0d6e465733ed5917c6a434b198fd4afd0695c2b6c298f54f031f90abc131d6f9",
        "CUHK-PEDES/imgs/train/00001_00.png": "f8820ecf2d1966c6cb8b53e299e00cbf58bfbb225b14713d77de6f2a015b57e5",
        "CUHK-PEDES/imgs/train/00001_01.png": "78ccd33a9d317c8bef9bd2ca94fa3fe4442b3864cbd33b46dd1817a7ead9a409",
        "CUHK-PEDES/imgs/train/00001_02.png": "1c83869f49127f113f0f1667aef7fd657ca0d81f416d4b36a6890a0996a16deb",
        "CUHK-PEDES/imgs/train/00002_00.png": "c334d098ade32958d3bc7d714f5dcfa4af96b968e97e74072d30524b20e117d2",
        "CUHK-PEDES/imgs/train/00002_01.png": "fec1c695adec7f955e1f9f4a6de287de69f54101489ea57e0379010f9b4fb673",
        "CUHK-PEDES/imgs/train/00002_02.png": "10155f28536fc4e8cab492bd0d3d11c48ff738c27d1b8d6a0d42dfe74d4734de",
        "CUHK-PEDES/imgs/train/00003_00.png": "50d934e1781a5f662cb71c85cd77688e15b0d156cbfa5769a36608a7c3cc48af",
        "CUHK-PEDES/imgs/train/00003_01.png": "e5624718fb825f9fb692eeb29eea908a6e4aea5f4befceb98b93a9d8e32a07da",
        "CUHK-PEDES/imgs/train/00003_02.png": "b7dc6bc8c6cc9ff69c9447aa0c6b25e99122e14705686ca0cdd1be843e2551a0",
        "CUHK-PEDES/imgs/val/00004_00.png": "9621995d5e47289141a9ceb76c6057f4de5ad045bd5e0166dd2c6caa2de87453",
        "CUHK-PEDES/imgs/val/00004_01.png": "b23aa38764b45b5404f52c225d33508bef33caa89d0c186250ad2d2dcf93fd0b",
        "CUHK-PEDES/imgs/val/00004_02.png": "cbfbd8f4472388e26b79feab3f51d9775d997ba67483901683d8458f2eb267dd",
        "CUHK-PEDES/reid_raw.json": "f51fefd4406301a5b91f8be900be8633770d4a3b942050f8558dd0e46dad5c85",
        "README.txt": "96065883bb1907fdb9a7cbca5f7091a65dd7bb86816d1d8f10e62ce12e728d19",
        "WebPerson/annotations.json": "434346615121193442aef724fb185debb51cb7df1aa10b684922c19abe376ddc",
        "WebPerson/annotations.jsonl": "8e605ce42bb52d9bd2de73916ff258e226066d4ddd1fa49db8a8bb2075a626b7",
        "WebPerson/images/0000/00000000.png": "e2b331e37fe98fb9b13fb0b1b7d875d458b0b370d80ac0b54aa175eddada1161",
        "WebPerson/images/0000/00000001.png": "93a7c19eac0457b9ebd0a6daaadda666dc7e6891cd641b246b7cd6af73ce40ea",
        "WebPerson/images/0000/00000002.png": "00f90751a80d51e55d197d137c069bbe99ae2473f6f78f9bb941f5dd3d8816ba",
        "WebPerson/images/0000/00000003.png": "44ffc53cae167c4374fd09354cbe9629cf551d02984ce5090a3039b9833200d0",
        "WebPerson/images/0000/00000004.png": "0eb34bba2a521e2c49031e9cae4e72bac662830ebfee5840b3f49b38a662e898",
        "WebPerson/images/0000/00000005.png": "d75b1b067b7bc20142e5eccd3edb73c1da5758bac97d19fa050efc0a36e7c4f3",
        "WebPerson/images/0000/00000006.png": "938c0a59cb6dd56afbb40d293137540652c11385fb72ec5978c7196427dc5400",
        "WebPerson/images/0000/00000007.png": "2b94c0d2c560a2441eb556cd5e3b02bc051b4efaaea94ea6d91613bca0a4bbe8",
        "WebPerson/images/0000/00000008.png": "e4bfb6ae2e555dbed47b10545c64f6438989779f8b926c70af5b271013f78951",
        "WebPerson/shards/webperson-000000.tar": "a79c1bd2090d92adb30855a310e493f735c07bac1265bf76a232b5a6cd71c4dc",
        "WebPerson/shards/webperson-000001.tar": "84587c02e63cb981ed4b2c98ceaf38780c70dd1748d867707f8b023410dd061f",
        "WebPerson/shards/webperson-000002.tar": "c1723227575e2478b75e4e6d5c46348bb675ea2cb9add63603d3f48d53ca83de",
        "WebPerson/shards/webperson-000003.tar": "35dc05a201309d391ee18ab86b0435f70d7e6e6473be24e04c6e38422723025e",
        "WebPerson/shards/webperson-000004.tar": "b1cd7d96b9931ab75cd422f52c1445a82639dd2a1fe20e694da566cf3886bcc7",
        "attributes.json": "258c43b3417d361334c05a1bf5daf60eaa0cba96f779eb1f0957ddd6fc5f231e",
        "meta.json": "5c80ec8abe534bd3068762327eae63181c9254f990573d7de6ca60d50f420bf8",
        "noise_report.json": "99f6c2b4083274c8dcff985ad74bd1069f2e6764c5ab46fdaf54eff69fee728b",
    },
    "wrong_attr_seed4": {
        ".gadms-synthetic": "4706c64ce98c4d7a75215cd3d0b17f6c6bacafffa66674f6f59db09768d40798",
        "CUHK-PEDES/imgs/test/00003_00.png": "e972327afb711c744363f0b4870bdd667f589ab76a0595ba332b980e5a1d1c5e",
        "CUHK-PEDES/imgs/train/00001_00.png": "30dd2829f1ffc56f8edcca594246192f1bb72592000b2534bf5303947216f3d3",
        "CUHK-PEDES/imgs/train/00002_00.png": "141efa7c17ba588493572186c571e6731d9d1066c2e6040a321f39e37f8844ea",
        "CUHK-PEDES/reid_raw.json": "dfe93ecf7bdb176009755a2e91f91d15965f8e7481fd8dab003e1b2c67acbf6a",
        "README.txt": "a637ac1c09e2f26badf4034d781679cbf7a8ddb974e24ad6bf05816f8b9d57e4",
        "WebPerson/annotations.json": "3fccbd7597221b7108bea59c8b987e0a0781218f057d73d4e6aaa4dbb1b2acde",
        "WebPerson/annotations.jsonl": "80322b49beb218cf684751937792cd6600719021486a0eb4ac90b1e99fcba3a5",
        "WebPerson/images/0000/00000000.png": "2a5dc852974d6e61af23a59ef94501f4478fd960961b03f39b10a7e5338ee0ea",
        "WebPerson/images/0000/00000001.png": "afe005b996f399457a5ab764bb896367073fd712a552dd3e5602aba72160a167",
        "WebPerson/images/0000/00000002.png": "7ec749ee7a6223a33a3a5bc338ccc228dba0f9ce330604d9626bcbe27ddc7b05",
        "WebPerson/images/0000/00000003.png": "67ade39d375738435e812a0a35c5139a95ae83064a1a2932babae3cb2864ef56",
        "WebPerson/images/0000/00000004.png": "1f46b35bc5334a1572162b53cdee40b6983af624cc5eafbf6cb9ffe941a41f37",
        "WebPerson/images/0000/00000005.png": "a377c6fd39fc0ba413188fb549294a96a18a8952b33d98c466d48ec36bfb4d3e",
        "WebPerson/images/0000/00000006.png": "ea012dc175170c5127b4b1e01f73e0a7a9c097da95b357be7cd169fbe1771643",
        "WebPerson/images/0000/00000007.png": "71672f37f79242604b9967ab9efcb02c50bc9df1cffbb0400b23b8a05930b77b",
        "WebPerson/images/0000/00000008.png": "f2597aae90e90e71d7c7c6b8dd8ec581fb5e98a722ff0bc56ed1aeebe087c915",
        "WebPerson/images/0000/00000009.png": "cc25e9b8c8c49a1e9be3eb2764b9108f9d5f07c54b21ca5a70f35166b5ac8362",
        "WebPerson/images/0000/00000010.png": "be1ed1d94ab88bb2c02a993240a83eb7ce2b2092b59e19a3ab9f4549bc626cd8",
        "WebPerson/images/0000/00000011.png": "bc94bc340eab88109dfb1c8f744def837c56bb20187fd39a6497b696896e6aef",
        "WebPerson/images/0000/00000012.png": "586feb96e8397f1f82e0e8865de562623aae2366886a780c3a6adcf60e36da81",
        "WebPerson/images/0000/00000013.png": "5c0b4eb445ac54133dccac9ef30441a6b875a555ea7c688d05c5fc074b510390",
        "WebPerson/images/0000/00000014.png": "78e48ed4ac4aa58446dff2ed466ab3f31b7229b61cbbf4ca7415bae49a2e7347",
        "WebPerson/images/0000/00000015.png": "b42ab96fdf5a1ae67fc55acd147f81eb0963075db7b65ea97b20801835be2447",
        "WebPerson/images/0000/00000016.png": "678e150ac32c3275aef6e530fc713441c0a14d11c2f172aa34bd2ac71ca6bc32",
        "WebPerson/images/0000/00000017.png": "22ec7b0193effc0fa93f28882b3cba5c337f5fc14330a0035406844483ef98b3",
        "WebPerson/images/0000/00000018.png": "1e8e10d304695b333709fed41a18ef967f20a0448e1d35591a236ebc86cc82b7",
        "WebPerson/images/0000/00000019.png": "22492441d78d26f7193f2749659031588f420bfb74c0ed43f0960e21ff8aae26",
        "WebPerson/images/0000/00000020.png": "17b2cbf99474d3adab2beb8e350429d9ea14dc78bac8eea52274fa4aca2764f4",
        "WebPerson/images/0000/00000021.png": "ab5f200df36b86412f6773a9389acc41bd20e265b87090cbeb6d730fb50c77fa",
        "WebPerson/images/0000/00000022.png": "28df0a8a3b250132ff73ba33ae31f5aacf338ed84b15b53a1de7680b018d4852",
        "WebPerson/images/0000/00000023.png": "9d3053009d4dd4d7a361b14dffe07c33ffd3006ca46b55f3bac651172da38cbe",
        "WebPerson/images/0000/00000024.png": "5d69ba5df83d41415cccecdedb0e4d616f02ae7f40cc5a4197cdd6308a0e1904",
        "WebPerson/images/0000/00000025.png": "f8ab787eb8e76c4fb2cafa44a27a647023dea09ac3e249da364f6949ab995324",
        "WebPerson/images/0000/00000026.png": "797237d7e7a66da4279a29669076f1327583787e96a962014974424493b2db1b",
        "WebPerson/images/0000/00000027.png": "82fd1c0329e4f5f5f2bca3a077ddd68f2bf1a71dc1f292d3920df5da933cf442",
        "WebPerson/images/0000/00000028.png": "ab03e8d94cad521bc64e7f04459727313f85b3c40ad6b10c1684f6e7d52542ea",
        "WebPerson/images/0000/00000029.png": "baa81e79a04bc58afa7a711630ab88b7b938cb094ee3dcbeb5e7a623b600d035",
        "WebPerson/images/0000/00000030.png": "1f28597cac4aca26ddd8d19dd6e90c9bf2a8a0196d62f798e771df006c589d77",
        "WebPerson/images/0000/00000031.png": "1c4311d1119321cfc7fba33a23bf6fa0efc57e4767763d8ddace543be97e963c",
        "WebPerson/images/0000/00000032.png": "e1821fd4e44ace4b6d5aecb2739bbec46fbbb507ae1b6ffe3a15bfaa9fbe4a7f",
        "WebPerson/images/0000/00000033.png": "507b96d3f81f9aa69dc6dae8a0c730c1ace761218db84cebc615004127e5c201",
        "WebPerson/images/0000/00000034.png": "92405b5fe83059fec0af599abf026893ef651776a670fffd7b9c3dc48c1f36e0",
        "WebPerson/images/0000/00000035.png": "f62f81f9fba2d963aa66d33497d30a37547e55b6e497f68a617958624a39c140",
        "WebPerson/images/0000/00000036.png": "c3addff976856660a02cfb8b64e823742f59f350c8f7624dfd761f5e14484f1b",
        "WebPerson/images/0000/00000037.png": "7f6e35f91d5cd3a8f9bd1c9ab42e96bb7f8958cc8b5e609d16a6ec2b8a00be5b",
        "WebPerson/images/0000/00000038.png": "19bae81c0be1503dfd48e9182af109194024fb22eebf21c273dcc4c0dc79e4d7",
        "WebPerson/images/0000/00000039.png": "f92a48931fca40647b62a898873948acf017d158560424c1c3fa686a23aae870",
        "WebPerson/shards/webperson-000000.tar": "6b560ce01cda1cfce20bf70d225b041945e17c84783d2d377e85eba75c9a36a6",
        "WebPerson/shards/webperson-000001.tar": "f51a49cd411d20a386db97588b096ab9045366b9b7d0327c06d3aada68b9306e",
        "WebPerson/shards/webperson-000002.tar": "2d7f53dab147cba68f74029e581eae0868bcad0f3078051e46cf25e5c31b9c53",
        "attributes.json": "5320d201d35d707a1e8f30c81273b4eb1317e4fbbc924e7797e1d28a06cfa0dc",
        "meta.json": "0a0dcc758972c9ca089c4214a7e03400f0802c9f89d00f8815ff45daad33eea6",
        "noise_report.json": "3bb05c85ded622c917bc3668d1d02fead9ae0de54d53c46afc821e015f6489dc",
    },
}

EXPECTED_GENERIC: dict[str, str] = {
    "identities": "cfa972bf872af6096a29da5e869a2fdde9da09e73cb8a7a7f9e12c629681688d",
    "images": "41f2b6def9ba816c10bea00b3573f77e522981e1ba756df78050af1b43a0d39e (5, 64, 32, 3) uint8",
    "captions": "9380caea65258b4b4435d9695a15181ab9ce08b71ea1d6706ead9dc426b1ef8c",
    "contact_sheet": "376b7e9a7c5e02dbd629249f7d24c2f3954d4fb5e15f0dc4ad319ee99a5a3efa (208, 268)",
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tree_digests(root: Path) -> dict[str, str]:
    """Relative POSIX path -> SHA-256 of every file under ``root``."""
    return {p.relative_to(root).as_posix(): _sha256(p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_generate_writes_pinned_bytes(name: str, tmp_path: Path) -> None:
    kwargs, workers = CONFIGS[name]
    overwrite = name in OVERWRITTEN
    if overwrite:
        generate(tmp_path, SyntheticConfig(**OVERWRITTEN[name]))
    generate(tmp_path, SyntheticConfig(**kwargs), workers=workers, overwrite=overwrite)
    got = _tree_digests(tmp_path)
    assert got == EXPECTED_FILES[name], f"digests of {name}:\n{json.dumps(got, indent=4)}"


def test_generic_corpus_and_contact_sheet_pinned() -> None:
    exclude = [p.key() for p in sample_identities(6, 0)]
    people, images, captions = generic_corpus(5, 1, captions_per_image=3, image_size=(64, 32), exclude=exclude,
                                             workers=2)
    rng = random.Random(11)
    sheet = contact_sheet([render_person(p, rng, (64, 32)) for p in people], columns=3)
    got = {
        "identities": _sha256(json.dumps([p.to_dict() for p in people], sort_keys=True).encode()),
        "images": _sha256(images.tobytes()) + f" {images.shape} {images.dtype}",
        "captions": _sha256(json.dumps(captions).encode()),
        "contact_sheet": _sha256(sheet.tobytes()) + f" {sheet.size}",
    }
    assert got == EXPECTED_GENERIC, f"digests:\n{json.dumps(got, indent=4)}"
